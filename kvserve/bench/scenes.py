"""The text of each scenario: a support desk's system prompt and customer questions, questions about a
document, a chat's follow-ups and replies, and a coding agent's tools, actions and observations.

Pure functions of a `random.Random` on top of corpus.py, so workloads.py only decides who shares what.
"""

from __future__ import annotations

import json
import random

from kvserve.bench.corpus import CHARS_PER_TOKEN, PARAGRAPHS, PLACES, fill, paragraph, prose

PRODUCTS = tuple(
    "Trailhead 40L backpack, Ridgeline rain jacket, Summit down sleeping bag, Cascade water filter, "
    "Granite hiking boots, Alpine trekking poles, Drift two-person tent, Ember camping stove, "
    "Harbor fleece pullover, Pioneer headlamp, Canyon insulated bottle, Meadow picnic blanket".split(", ")
)

SUPPORT_RULES = (
    "You are the customer support assistant of Northwind Outfitters, a shop for outdoor clothing and camping "
    "equipment. Answer in a friendly, concise way, in at most three sentences unless the customer asks for "
    "detail. Never invent order details: if you need an order number, ask for it. Do not promise refunds or "
    "replacements that the policies below do not allow; offer to pass the case to a human colleague instead.",
    "Returns: unused items in their original packaging can be returned within 60 days of delivery for a full "
    "refund. Used items can be returned within 30 days if they are faulty. Sale items can be exchanged but "
    "not refunded. The customer pays return postage unless the item is faulty or we sent the wrong item.",
    "Shipping: standard delivery takes three to five working days and is free above 50 pounds; express "
    "delivery takes one working day and costs 7 pounds. We ship to the whole country and to most of Europe; "
    "international orders take seven to twelve working days and may be charged import duties on arrival.",
    "Warranty: tents, stoves, filters and headlamps carry a two-year warranty; boots and jackets carry one "
    "year. The warranty covers manufacturing faults, not wear and tear, accidents or misuse. For a claim, the "
    "customer sends a photograph of the fault and the order number to the warranty team.",
    "Care advice: wash waterproof jackets at thirty degrees with a technical cleaner and no fabric softener, "
    "then tumble dry on low heat to restore the coating. Sleeping bags should be stored loose, never in their "
    "compression sack. Boots should dry away from direct heat, stuffed with newspaper.",
    "Tone: be warm but not gushing, do not use exclamation marks more than once per answer, and avoid "
    "technical jargon unless the customer uses it first. If a customer is upset, acknowledge the problem "
    "before explaining the policy. Sign off with the customer's first name when you know it.",
)

SUPPORT_QUESTIONS = (
    "Can I still return my {product} after {n} weeks?",
    "How long does delivery to {place} usually take?",
    "My {product} arrived with a broken zip. What should I do?",
    "Is the {product} covered by a warranty, and for how long?",
    "How should I wash the {product}?",
    "Do you ship to {place}, and is there a charge?",
    "I bought the {product} in the sale. Can I get my money back?",
    "Order {order} has not arrived after {n} days. Can you check it?",
    "What is the difference between standard and express delivery?",
    "Can I exchange the {product} for a different size?",
)

DOC_QUESTIONS = (
    "Who led the work on {thing} in {place}?",
    "What did {org} conclude about {thing}?",
    "Why were residents of {place} divided about {thing}?",
    "How did the cost of {thing} compare with the first estimate?",
    "What happened to {thing} during the storm described in the text?",
    "Summarize the history of {thing} in two sentences.",
    "Which people are mentioned in the document, and what was their role?",
    "What criticism was made of {thing}?",
    "Where are the original drawings of {thing} kept today?",
    "How many times were the plans for {thing} revised?",
)

FOLLOW_UPS = (
    "Can you explain that in simpler words?",
    "Why is that the case?",
    "Could you give me a concrete example?",
    "What would you recommend doing first?",
    "Is there anything I should be careful about?",
    "How does that compare with the alternative?",
    "Can you summarize what we discussed so far?",
)

TOOLS = (
    ("search_code", "Search the repository for a regular expression and return matching lines with paths."),
    ("read_file", "Return the contents of a file, optionally a range of lines."),
    ("run_tests", "Run the test suite or one test file and return the summary and any failures."),
    ("edit_file", "Replace an exact snippet of a file with new text; fails if the snippet is not unique."),
    ("list_dir", "List the files and folders under a path."),
)

FILES = ("billing/invoice.py", "billing/tax.py", "api/routes.py", "api/auth.py", "core/cache.py", "core/queue.py")


def support_system_prompt(rng: random.Random, num_tokens: int) -> str:
    """Rules, then a seeded product catalogue, then prose on the shop's history, to about `num_tokens`."""
    parts = list(SUPPORT_RULES)
    catalogue = ["Catalogue:"]
    for i, product in enumerate(PRODUCTS):
        price = rng.randint(12, 240)
        catalogue.append(f"- {product} (item NW-{1000 + 37 * i}): {price} pounds, in stock at {rng.choice(PLACES)}.")
    parts.append("\n".join(catalogue))
    used = sum(len(p) + 2 for p in parts)
    rest = max(0, int(num_tokens * CHARS_PER_TOKEN) - used)
    if rest > 200:
        parts.append("Background on the company, for context only:\n" + prose(rng, int(rest / CHARS_PER_TOKEN)))
    return "\n\n".join(parts)


def support_question(rng: random.Random) -> str:
    return rng.choice(SUPPORT_QUESTIONS).format(
        product=rng.choice(PRODUCTS),
        place=rng.choice(PLACES),
        n=rng.randint(2, 10),
        order=f"NW-{rng.randint(100000, 999999)}",
    )


def document(rng: random.Random, title: str, about: dict[str, str], num_tokens: int) -> str:
    return f"{title}\n\n" + prose(rng, num_tokens, **about)


def document_question(rng: random.Random, about: dict[str, str]) -> str:
    return rng.choice(DOC_QUESTIONS).format(**about)


def opening_question(rng: random.Random) -> str:
    """The first message of a conversation: a few sentences of context, then a question."""
    context = fill(rng, rng.choice(("{person} lives in {place} and works for {org}.", "I am writing about {thing}.")))
    return f"{context} {rng.choice(PARAGRAPHS)} What do you make of this?"


def follow_up(rng: random.Random) -> str:
    return rng.choice(FOLLOW_UPS)


def assistant_reply(rng: random.Random) -> str:
    """A canned assistant turn (the history resent is the workload's, not the server's, so runs compare)."""
    return paragraph(rng)


def agent_system_prompt(task: str) -> str:
    """The system turn; the tools themselves travel in the request's `tools` (agent_tools())."""
    return (
        "You are a coding agent working in a Python repository. Think step by step. At each step call exactly "
        "one of the tools you are given, or reply with a short summary when the task is finished.\n\n"
        f"Task: {task}"
    )


_TOOL_PARAMETERS = {
    "search_code": {"pattern": ("string", "A regular expression."), "path": ("string", "Where to look.")},
    "read_file": {"path": ("string", "The file."), "start": ("integer", "First line."), "end": ("integer", "Last.")},
    "run_tests": {"path": ("string", "A test file, or the whole suite when absent.")},
    "edit_file": {"path": ("string", "The file."), "old": ("string", "Snippet."), "new": ("string", "Text.")},
    "list_dir": {"path": ("string", "The folder.")},
}
_TOOL_REQUIRED = {"search_code": ["pattern"], "read_file": ["path"], "edit_file": ["path", "old", "new"]}


def agent_tools() -> list[dict]:
    """TOOLS as OpenAI function tools, each with a JSON schema for its arguments."""
    out = []
    for name, desc in TOOLS:
        props = {k: {"type": t, "description": d} for k, (t, d) in _TOOL_PARAMETERS[name].items()}
        params = {"type": "object", "properties": props, "required": _TOOL_REQUIRED.get(name, [])}
        out.append({"type": "function", "function": {"name": name, "description": desc, "parameters": params}})
    return out


def agent_task(rng: random.Random) -> str:
    return fill(
        rng, "Fix the failing test about {thing} reported by {person}; the bug appeared after the {year} refactor."
    )


def agent_call(rng: random.Random, call_id: str) -> dict:
    """One OpenAI tool call (arguments as a JSON string, as the API sends them back)."""
    name = rng.choice(TOOLS)[0]
    path = rng.choice(FILES)
    args: dict = {"path": path}
    if name == "search_code":
        args = {"pattern": rng.choice(("def total", "round(", "cache.get", "raise ValueError"))}
    elif name == "edit_file":
        args |= {"old": "round(subtotal * rate, 2)", "new": f"round(subtotal * (1 + rate), {rng.randint(0, 4)})"}
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def agent_observation(rng: random.Random, num_tokens: int) -> str:
    """What a tool returned: source lines or a test log, about `num_tokens` long."""
    lines = []
    target = int(num_tokens * CHARS_PER_TOKEN)
    n = 1
    while sum(len(x) + 1 for x in lines) < target:
        path = rng.choice(FILES)
        kind = rng.random()
        if kind < 0.4:
            lines.append(f"{path}:{rng.randint(10, 400)}:    total = round(subtotal * (1 + rate), {rng.randint(0, 4)})")
        elif kind < 0.7:
            lines.append(
                f"FAILED tests/test_{path.split('/')[1]}::test_case_{n} - AssertionError: expected {rng.randint(1, 99)}"
            )
        else:
            lines.append(
                f"# {fill(rng, rng.choice(('Note: {person} changed this in {year}.', 'See the report by {org}.')))}"
            )
        n += 1
    return "\n".join(lines)
