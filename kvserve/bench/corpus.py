"""English text for the workloads: hand-written paragraphs, sentence templates and names, composed from a seed.

Realistic prose matters: a benchmark of random token ids measures tokenizer edge cases and attention over
noise, not what users send. Everything here is a pure function of a `random.Random`, so a seed fixes every
prompt. Lengths are aimed at in characters, at CHARS_PER_TOKEN per token: this prose ran 4.4 characters a token
under the bundled SmolLM2 tokenizer (GPT-2-style BPE); the test suite checks sizes with the same rule.
"""

from __future__ import annotations

import random

CHARS_PER_TOKEN = 4.4

PARAGRAPHS = (
    "The river has always set the rhythm of the valley. In spring the snowmelt lifts it over the lower meadows, "
    "and farmers wait until the water falls back before they plough; in late summer it shrinks to a chain of "
    "pools where children catch minnows with their hands. The old mill still stands at the bend, its wheel long "
    "gone, and the stones of its race are the best place to cross when the water is low.",
    "Most failures in a distributed system are partial. One machine stops answering while its neighbours carry "
    "on, a network link drops a fraction of its packets, or a disk slows down without ever reporting an error. "
    "Engineers who design for these cases assume that any remote call may time out, that retries must be safe "
    "to repeat, and that the slowest replica, not the average one, decides how long a user waits.",
    "A good loaf needs less effort than patience. Mix flour, water, salt and a little yeast the evening before, "
    "cover the bowl and leave it on the counter overnight. In the morning the dough will have doubled and "
    "smell faintly sour; fold it a few times, shape it gently, and let it rise again while the oven and the "
    "heavy pot inside it heat for a full half hour.",
    "The committee met every Thursday in the small room above the library. Its members disagreed about almost "
    "everything, from the colour of the new signs to the hours of the reading room, yet the minutes show that "
    "they never once failed to reach a decision before the building closed. The secret, one of them later "
    "wrote, was that nobody was allowed to speak twice before everyone had spoken once.",
    "Migratory birds navigate with several senses at once. They read the position of the sun during the day and "
    "the rotation of the stars at night, and many species can sense the direction of the earth's magnetic "
    "field. Young birds on their first journey rely mostly on an inherited heading; older birds correct their "
    "course using landmarks such as coastlines and mountain ranges they remember from earlier years.",
    "When the company moved its support desk online, the number of tickets doubled in a month, but the time to "
    "resolve each one fell by a third. Customers who once waited on the phone now attached photographs of the "
    "problem, and staff could answer the most common questions with a link to a short article. The articles "
    "that helped most were the ones written by the agents themselves, in plain words.",
    "The museum's newest gallery is devoted to everyday objects: a kettle from the nineteen thirties, a child's "
    "school satchel, a typewriter whose ribbon still carries the ghost of its last letter. Visitors linger "
    "longer here than in the rooms of paintings next door, reading the labels that tell who owned each object "
    "and how it came to be donated, often by a grandchild clearing out an attic.",
    "Caching works because requests repeat. A web page that a thousand readers open in the same hour need not be "
    "rebuilt a thousand times, and a query whose answer has not changed need not run again. The hard part is "
    "knowing when a stored answer has gone stale, and deciding what to throw away when memory runs short; a "
    "cache that guesses wrong is slower than having no cache at all.",
    "The coastal path climbs steeply from the harbour and then follows the cliff top for eleven miles. Walkers "
    "should carry water, because there are no shops between the two villages, and they should check the tide "
    "tables before taking the shortcut across the sands at the estuary. In fog the path is easy to lose where "
    "it crosses the open heath, so the marker posts are painted white.",
    "Learning a second language as an adult is less about memory than about habit. Ten minutes of reading every "
    "day does more than a two-hour lesson once a week, and speaking badly with a patient friend does more than "
    "studying grammar alone. The learners who succeed are rarely the most gifted; they are the ones who are "
    "willing to sound foolish for a while and keep going anyway.",
    "The observatory was built on the ridge in the year the railway reached the town, and for decades it held "
    "the largest telescope in the region. Light from the growing city slowly washed out the faint galaxies its "
    "astronomers had studied, and research moved to darker sites in the desert. Today the dome opens on clear "
    "Friday evenings for schoolchildren, who line up to see the rings of Saturn.",
    "Good documentation answers the question the reader actually has. A reference page lists every option, "
    "but a newcomer needs one worked example that runs, and an expert debugging a failure needs to know which "
    "assumptions the code makes and what happens when they are broken. The best projects keep these three kinds "
    "of writing apart and test their examples as carefully as their code.",
)

PEOPLE = tuple(
    "Amara Okafor, Lukas Brandt, Mei Tanaka, Diego Fernández, Priya Raman, Tomasz Nowak, "
    "Sofia Lindqvist, Kwame Mensah, Elena Petrova, Hiroshi Sato, Grace Whitfield, Omar Haddad, "
    "Ingrid Solberg, Rafael Costa, Nadia Rahman, Owen Gallagher".split(", ")
)
PLACES = tuple(
    "Vellmont, Ashford Bay, Kirkhaven, Lower Marston, Port Edra, Calloway, Brindle Cross, Saltmere, "
    "Oakridge, Northfen, Riverton, Elmstead, Greywater, Harrowgate".split(", ")
)
ORGS = tuple(
    "the Regional Water Board, the Harbour Trust, Northwind Outfitters, the City Archive, "
    "the Meridian Rail Company, the Valley Growers' Cooperative, Brightline Software, the County Museum, "
    "the Coastal Rescue Service, the Institute of Applied Acoustics".split(", ")
)
THINGS = tuple(
    "the new pumping station, the stone bridge, the winter timetable, the library extension, "
    "the flood barrier, the apprenticeship scheme, the billing system, the night ferry, the solar array, "
    "the annual book fair, the seed bank, the tram line".split(", ")
)

TEMPLATES = (
    "In {year}, {org} began work on {thing} in {place}, led by {person}.",
    "{person} argued that {thing} would pay for itself within {n} years, a claim the council doubted.",
    "By {year} the project in {place} employed {n0} people, most of them hired locally.",
    "The first estimate for {thing} was {n0} thousand pounds; the final cost was nearly twice that.",
    "Residents of {place} were divided: some welcomed {thing}, while others feared the noise and traffic.",
    "{person} kept a detailed diary of those years, which is now held by {org}.",
    "A storm in the autumn of {year} damaged {thing} and delayed its opening by {n} months.",
    "According to {person}, the most difficult decision was where in {place} to build {thing}.",
    "{org} published a report in {year} concluding that {thing} had reduced costs by {n} percent.",
    "Visitors to {place} can still see the plaque that {person} unveiled on the opening day.",
    "The plans for {thing} were revised {n} times before {org} approved them.",
    "Critics pointed out that {thing} served {place} well but did little for the surrounding villages.",
    "{person} retired in {year}, and the running of {thing} passed to a younger team.",
    "Records from {org} show that about {n0} people used {thing} in its first full year.",
    "The original drawings of {thing}, signed by {person}, were rediscovered in {year} in a cellar in {place}.",
    "Today {thing} in {place} is maintained by {org}, which opens it to the public twice a year.",
)


def fill(rng: random.Random, template: str, **fixed: str) -> str:
    """One template sentence with its slots drawn from `rng` (or taken from `fixed`)."""
    slots = {
        "person": rng.choice(PEOPLE),
        "place": rng.choice(PLACES),
        "org": rng.choice(ORGS),
        "thing": rng.choice(THINGS),
        "year": str(rng.randint(1890, 2020)),
        "n": str(rng.randint(2, 12)),
        "n0": str(rng.randint(3, 90) * 10),
    }
    slots.update(fixed)
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def paragraph(rng: random.Random, **fixed: str) -> str:
    """A paragraph: either a hand-written one or four to seven template sentences on shared subjects."""
    if rng.random() < 0.4:
        return rng.choice(PARAGRAPHS)
    return " ".join(fill(rng, t, **fixed) for t in rng.sample(TEMPLATES, rng.randint(4, 7)))


def prose(rng: random.Random, num_tokens: int, **fixed: str) -> str:
    """Paragraphs joined by blank lines until about `num_tokens` tokens (CHARS_PER_TOKEN characters each)."""
    target = int(num_tokens * CHARS_PER_TOKEN)
    parts: list[str] = []
    size = 0
    while size < target:
        p = paragraph(rng, **fixed)
        parts.append(p)
        size += len(p) + 2
    text = "\n\n".join(parts)
    return _cut_at_sentence(text, target)


def _cut_at_sentence(text: str, target: int) -> str:
    """`text` cut to the last sentence end at or before `target` characters (never below 90% of it)."""
    if len(text) <= target:
        return text
    end = text.rfind(". ", 0, target)
    return text[: end + 1] if end >= int(target * 0.9) else text[:target]


def subject(rng: random.Random) -> dict[str, str]:
    """A fixed person, place, organisation and thing, so a document stays about one story."""
    return {
        "person": rng.choice(PEOPLE),
        "place": rng.choice(PLACES),
        "org": rng.choice(ORGS),
        "thing": rng.choice(THINGS),
    }
