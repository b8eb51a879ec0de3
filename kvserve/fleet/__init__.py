"""Scale-out on Ray Serve: engine replicas behind one endpoint, routed by kvserve/router's policies.

Imported only by `kvserve serve --replicas N` (N >= 2) and its tests: a single server never imports Ray.
"""
