"""Replica routing: which engine replica serves a request (prefix-aware, KV-load-aware), in plain Python.

kvserve/router/ imports no Ray: kvserve/fleet/ binds it to Ray Serve, bench/routing.py simulates fleets with it.
"""
