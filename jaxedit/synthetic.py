"""A stream of edit requests that needs no download: invented subjects, real relations, closed answer sets.

:func:`synthetic_edits` returns zsRE-format records (``src``, ``rephrase``, ``answers``, ``subject``, ``loc``,
``loc_ans``) that :func:`jaxedit.zsre_eval` scores and :func:`jaxedit.edit_sequential` edits, so a lifelong-editing
run of tens of thousands of edits works offline:

* the **subject** is an invented, pronounceable name (a person's first and last name, or a made-up place, company,
  band, dish, ... name), drawn from syllables, several tokens long, never repeated within a stream; a model has no
  prior fact about it;
* the **relation** is one of :data:`RELATIONS` (20 relations, 3 prompt templates each: ``src`` is written with one,
  ``rephrase`` with another), and the **target** is drawn from the relation's closed answer set (real cities,
  languages, instruments, ...), so every target is a word the model knows;
* the **neighborhood** (``loc`` / ``loc_ans``) is a fact the model answers correctly before any edit: a prompt and
  its answer from a known-facts set, which for the default model (SmolLM2-135M) ships with jaxedit
  (``jaxedit/data/known_facts_smollm2.jsonl``, built by ``benchmarks/data/build_known_facts.py``: greedy decoding
  of :data:`FACT_CANDIDATES`, kept when the continuation begins with the answer). Its prompt is a completion, not a
  question, so records carry ``loc_suffix: ""`` (zsRE's own records append "?" to ``loc``).

The stream is a pure function of ``(n, seed)`` and the known-facts set: the same arguments give the same records,
and the first k records of a longer stream are the k records of a shorter one.
"""
from __future__ import annotations

import json
import os
import random
from typing import Optional

from jaxedit.errors import JaxeditError
from jaxedit import runtime
from jaxedit.edit.stats import model_fingerprint
from jaxedit.evaluate.editing import generative_match, greedy_continuations

KNOWN_FACTS_SMOLLM2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "known_facts_smollm2.jsonl")

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Moscow", "Cairo", "Sydney", "Toronto", "Chicago",
          "Vienna", "Prague", "Dublin", "Lisbon", "Athens", "Warsaw", "Istanbul", "Mumbai", "Seoul", "Bangkok",
          "Stockholm", "Amsterdam", "Barcelona", "Boston", "Munich", "Oslo", "Helsinki"]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
             "Russia", "Egypt", "Australia", "Sweden", "Norway", "Poland", "Greece", "Turkey", "Argentina",
             "Portugal", "Ireland", "Finland", "Kenya", "Peru"]
LANGUAGES = ["English", "French", "German", "Spanish", "Italian", "Russian", "Japanese", "Chinese", "Arabic",
             "Portuguese", "Dutch", "Swedish", "Polish", "Greek", "Turkish", "Korean", "Hindi", "Finnish"]
OCCUPATIONS = ["doctor", "lawyer", "teacher", "nurse", "pilot", "farmer", "chef", "banker", "painter", "journalist",
               "singer", "carpenter", "dentist", "baker", "poet", "plumber", "sailor", "tailor"]
INSTRUMENTS = ["piano", "violin", "guitar", "cello", "flute", "trumpet", "drums", "harp", "saxophone", "clarinet",
               "organ", "trombone"]
SPORTS = ["football", "tennis", "basketball", "golf", "cricket", "hockey", "baseball", "rugby", "volleyball",
          "boxing", "cycling", "swimming"]
COMPANIES = ["Google", "Microsoft", "Apple", "Amazon", "IBM", "Intel", "Samsung", "Toyota", "Nokia", "Siemens",
             "Sony", "Honda", "Boeing", "Netflix"]
FIELDS = ["physics", "chemistry", "biology", "mathematics", "astronomy", "geology", "medicine", "economics",
          "linguistics", "philosophy", "history", "psychology"]
GENRES = ["jazz", "rock", "blues", "reggae", "folk", "punk", "techno", "opera", "metal", "disco", "soul", "gospel"]
PRODUCTS = ["cars", "shoes", "phones", "furniture", "chocolate", "beer", "software", "toys", "bicycles", "cheese",
            "watches", "cameras"]
CONTINENTS = ["Africa", "Asia", "Europe", "South America", "North America", "Australia"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
ANIMALS = ["dog", "cat", "horse", "sheep", "cattle", "goat", "chicken", "pig", "rabbit", "duck"]

# (relation id, subject kind, templates ("{}": the subject; the answer follows after a space), answer set)
RELATIONS = [
    ("P19", "person", ["{} was born in the city of", "The birthplace of {} is the city of",
                       "{}'s place of birth is the city of"], CITIES),
    ("P20", "person", ["{} died in the city of", "The place of death of {} is the city of",
                       "{} passed away in the city of"], CITIES),
    ("P1412", "person", ["The native language of {} is", "{} grew up speaking", "{} is a native speaker of"],
     LANGUAGES),
    ("P27", "person", ["{} is a citizen of", "{} holds the citizenship of", "The country of citizenship of {} is"],
     COUNTRIES),
    ("P106", "person", ["{} works as a", "By profession, {} is a", "The occupation of {} is"], OCCUPATIONS),
    ("P1303", "person", ["{} plays the", "The instrument played by {} is the", "{} is a musician who plays the"],
     INSTRUMENTS),
    ("P641", "person", ["{} is a professional player of", "The sport played by {} is",
                        "{} competes professionally in"], SPORTS),
    ("P108", "person", ["{} works for", "The employer of {} is", "{} is employed by"], COMPANIES),
    ("P101", "person", ["{} is a scientist who studies", "The field of research of {} is", "{} is an expert in"],
     FIELDS),
    ("P136", "band", ["{} is a band that plays", "The musical genre of {} is", "The band {} is known for its"],
     GENRES),
    ("P17", "town", ["{} is a town in the country of", "The town of {} is located in", "{} is a small town in"],
     COUNTRIES),
    ("P159", "company", ["The headquarters of {} are in the city of", "{} is a company based in the city of",
                         "{} has its head office in the city of"], CITIES),
    ("P1056", "company", ["{} is a company that makes", "The main product of {} is", "{} is best known for making"],
     PRODUCTS),
    ("P30", "river", ["The river {} flows through", "{} is a river in", "The river {} is located in"], CONTINENTS),
    ("P37", "island", ["The official language of {} is", "People on the island of {} speak",
                       "On the island of {}, the official language is"], LANGUAGES),
    ("P36", "province", ["The capital of the province of {} is", "The province of {} has its capital in",
                         "{} is a province whose capital is"], CITIES),
    ("P495", "dish", ["{} is a traditional dish from", "The dish {} comes from", "{} is a food that originated in"],
     COUNTRIES),
    ("P407", "novel", ["The novel {} was written in", "The original language of the novel {} is",
                       "{} is a novel written in"], LANGUAGES),
    ("P462", "flag", ["The flag of {} is mostly", "The main color of the flag of {} is",
                      "The flag of {} is dominated by the color"], COLORS),
    ("P4743", "breed", ["{} is a breed of", "The animal breed {} is a kind of", "{} is a domestic breed of"],
     ANIMALS),
]

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st",
          "sh", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "m", "k"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def invented_name(rng: random.Random, kind: str) -> str:
    """A pronounceable invented name: a first and a last name (2 and 2-3 syllables) for a person, one word of
    3 syllables otherwise (consonant cluster + vowel + optional coda per syllable)."""
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    return _word(rng, 3)


def possible_subjects(kind: str) -> int:
    """How many distinct names :func:`invented_name` can draw for ``kind`` (a lower bound: syllable strings that
    spell the same word counted once is not attempted)."""
    per = len(ONSETS) * len(set(VOWELS)) * len(set(CODAS))
    return per ** 2 * (per ** 2 + per ** 3) if kind == "person" else per ** 3


def read_known_facts(path: str = KNOWN_FACTS_SMOLLM2) -> tuple:
    """(meta, facts) from a known-facts JSONL file: a first line {"meta": {...}} (the model it was probed on, its
    fingerprint, how many candidates were probed), then one {"prompt", "answer", "relation"} a line."""
    if not os.path.exists(path):
        raise JaxeditError(f"{path}: no such file (build it with benchmarks/data/build_known_facts.py)")
    meta, facts = {}, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxeditError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if "meta" in d:
                meta = d["meta"]
            elif isinstance(d.get("prompt"), str) and isinstance(d.get("answer"), str) and d["answer"].strip():
                facts.append(d)
            else:
                raise JaxeditError(f"{path}:{n}: a known fact needs \"prompt\" and \"answer\" strings")
    if not facts:
        raise JaxeditError(f"{path}: no known facts")
    return meta, facts


def known_facts(model=None, *, tokenizer=None) -> list:
    """The facts a model answers correctly (greedy decoding; :func:`jaxedit.evaluate.editing.generative_match`):
    the shipped SmolLM2-135M set when ``model`` is None or is that model (same weights fingerprint); for another
    model, :data:`FACT_CANDIDATES` probed now (needs ``tokenizer``). Refused when the model knows none."""
    meta, facts = read_known_facts()
    if model is None:
        return facts
    if meta.get("fingerprint") == model_fingerprint(model):
        return facts
    if tokenizer is None:
        raise JaxeditError("synthetic_edits with a model other than the default one probes its known facts: pass "
                           "tokenizer= too")
    runtime.stage(f"probing {len(FACT_CANDIDATES)} candidate facts on the model (its neighborhood prompts)")
    kept = probe_facts(model, tokenizer, FACT_CANDIDATES)
    if not kept:
        raise JaxeditError(f"the model answers none of the {len(FACT_CANDIDATES)} candidate facts correctly: no "
                           f"neighborhood prompts for a synthetic stream (pass model=None for the default model's)")
    return kept


def probe_facts(model, tokenizer, candidates) -> list:
    """The candidates (dicts with "prompt", "answer") whose greedy continuation begins with the answer."""
    conts = greedy_continuations(model, [c["prompt"] for c in candidates], tokenizer=tokenizer,
                                 targets=[c["answer"] for c in candidates])
    return [dict(c) for c, t in zip(candidates, conts) if generative_match(t, c["answer"])]


def synthetic_edits(n: int, *, seed: int = 0, model=None, tokenizer=None) -> list:
    """``n`` zsRE-format edit records (see the module docstring): ``src``, ``rephrase`` (another template of the
    same relation), ``answers`` ([target]), ``subject`` (invented, unique within the stream), ``loc``/``loc_ans``
    (a fact the model knows) with ``loc_suffix: ""``, ``relation`` and ``case_id``. ``model``/``tokenizer``: whose
    known facts give the neighborhood (default: the shipped SmolLM2-135M set; another model is probed)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise JaxeditError(f"synthetic_edits needs a positive number of records (got {n!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise JaxeditError(f"the seed must be a non-negative integer (got {seed!r})")
    facts = known_facts(model, tokenizer=tokenizer)
    rng = random.Random(f"jaxedit-synthetic-{seed}")
    used: set = set()
    out = []
    for i in range(n):
        rid, kind, templates, answers = RELATIONS[rng.randrange(len(RELATIONS))]
        subject = invented_name(rng, kind)
        while subject in used:
            subject = invented_name(rng, kind)
        used.add(subject)
        a, b = rng.sample(range(len(templates)), 2)
        fact = facts[rng.randrange(len(facts))]
        out.append({"case_id": i, "relation": rid, "subject": subject, "src": templates[a].format(subject),
                    "rephrase": templates[b].format(subject), "answers": [rng.choice(answers)],
                    "loc": fact["prompt"], "loc_ans": fact["answer"], "loc_suffix": "",
                    "templates": [a, b]})
    return out


def parse_synthetic(spec: str) -> tuple:
    """``"synthetic:N[:SEED]"`` -> (N, SEED); one error line otherwise."""
    parts = spec.split(":")
    if parts[0] != "synthetic" or len(parts) not in (2, 3):
        raise JaxeditError(f"{spec!r}: a synthetic stream is synthetic:N or synthetic:N:SEED")
    try:
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise JaxeditError(f"{spec!r}: N and SEED of synthetic:N[:SEED] must be integers") from None
    if n < 1 or seed < 0:
        raise JaxeditError(f"{spec!r}: N must be >= 1 and SEED >= 0")
    return n, seed


def stream_statistics() -> dict:
    """Relations, templates, answers and how many distinct records a stream can hold (subjects x targets x ordered
    template pairs x neighborhood facts, summed over relations)."""
    _, facts = read_known_facts()
    distinct = sum(possible_subjects(kind) * len(answers) * len(t) * (len(t) - 1) * len(facts)
                   for _, kind, t, answers in RELATIONS)
    return {"relations": len(RELATIONS), "templates": {r: len(t) for r, _, t, _ in RELATIONS},
            "answers": {r: len(a) for r, _, _, a in RELATIONS}, "known_facts": len(facts),
            "distinct_records": distinct}


def _facts():
    """The candidate facts probed for the neighborhood (prompt, answer, relation), written for jaxedit."""
    capitals = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
                "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
                "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm",
                "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels",
                "the Netherlands": "Amsterdam", "Hungary": "Budapest", "the Czech Republic": "Prague",
                "Turkey": "Ankara", "India": "New Delhi", "Thailand": "Bangkok", "South Korea": "Seoul",
                "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
                "Kenya": "Nairobi", "Australia": "Canberra", "the United Kingdom": "London",
                "the United States": "Washington", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad",
                "Chile": "Santiago", "Colombia": "Bogota", "Vietnam": "Hanoi", "Indonesia": "Jakarta"}
    languages = {"France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish",
                 "Japan": "Japanese", "China": "Chinese", "Russia": "Russian", "Brazil": "Portuguese",
                 "Portugal": "Portuguese", "Mexico": "Spanish", "Argentina": "Spanish", "Greece": "Greek",
                 "Poland": "Polish", "Sweden": "Swedish", "the Netherlands": "Dutch", "Turkey": "Turkish",
                 "South Korea": "Korean", "Egypt": "Arabic", "Finland": "Finnish", "Hungary": "Hungarian",
                 "the United States": "English", "Australia": "English", "Israel": "Hebrew", "Iran": "Persian"}
    continents = {"France": "Europe", "Germany": "Europe", "Japan": "Asia", "China": "Asia", "India": "Asia",
                  "Brazil": "South America", "Argentina": "South America", "Kenya": "Africa", "Egypt": "Africa",
                  "Nigeria": "Africa", "Canada": "North America", "Mexico": "North America", "Italy": "Europe",
                  "Peru": "South America", "Thailand": "Asia", "Spain": "Europe"}
    currencies = {"Japan": "yen", "the United States": "dollar", "the United Kingdom": "pound", "India": "rupee",
                  "Russia": "ruble", "China": "yuan", "Mexico": "peso", "South Korea": "won", "Brazil": "real",
                  "Switzerland": "franc", "Germany": "euro", "France": "euro", "Sweden": "krona"}
    landmarks = {"The Eiffel Tower": "Paris", "The Colosseum": "Rome", "Big Ben": "London",
                 "The Statue of Liberty": "New York", "The Kremlin": "Moscow", "The Brandenburg Gate": "Berlin",
                 "The Sagrada Familia": "Barcelona", "The Acropolis": "Athens", "The Golden Gate Bridge":
                 "San Francisco", "The Leaning Tower of Pisa": "Pisa", "The Sydney Opera House": "Sydney",
                 "The Louvre": "Paris", "Buckingham Palace": "London", "The Vatican": "Rome",
                 "The Forbidden City": "Beijing", "The Taj Mahal": "Agra", "Times Square": "New York",
                 "The Space Needle": "Seattle", "The CN Tower": "Toronto", "The Alhambra": "Granada"}
    out = []
    for c, a in capitals.items():
        out.append({"prompt": f"The capital of {c} is", "answer": a, "relation": "capital"})
        out.append({"prompt": f"The capital city of {c} is", "answer": a, "relation": "capital"})
    for c, a in languages.items():
        out.append({"prompt": f"The official language of {c} is", "answer": a, "relation": "language"})
        out.append({"prompt": f"Most people in {c} speak", "answer": a, "relation": "language"})
    for c, a in continents.items():
        out.append({"prompt": f"{c} is a country in the continent of", "answer": a, "relation": "continent"})
    for c, a in currencies.items():
        out.append({"prompt": f"The currency of {c} is the", "answer": a, "relation": "currency"})
    for s, a in landmarks.items():
        out.append({"prompt": f"{s} is located in the city of", "answer": a, "relation": "landmark"})
    people = [("Albert Einstein", "physicist", "{} was a famous"), ("Pablo Picasso", "painter", "{} was a famous"),
              ("Wolfgang Amadeus Mozart", "composer", "{} was a famous"),
              ("William Shakespeare", "playwright", "{} was a famous"),
              ("Charles Darwin", "naturalist", "{} was a famous"), ("Isaac Newton", "physicist", "{} was a famous"),
              ("Leonardo da Vinci", "painter", "{} was a famous"), ("Lionel Messi", "football", "{} plays"),
              ("Roger Federer", "tennis", "{} plays"), ("Michael Jordan", "basketball", "{} played"),
              ("Tiger Woods", "golf", "{} plays"), ("Barack Obama", "United States", "{} was the president of the"),
              ("Steve Jobs", "Apple", "{} was the co-founder of"), ("Bill Gates", "Microsoft", "{} is the co-founder of"),
              ("Mark Zuckerberg", "Facebook", "{} is the founder of"), ("Jeff Bezos", "Amazon", "{} is the founder of"),
              ("Elon Musk", "Tesla", "{} is the CEO of"), ("Neil Armstrong", "moon", "{} was the first man on the"),
              ("J. K. Rowling", "Harry Potter", "{} is the author of"),
              ("Ludwig van Beethoven", "composer", "{} was a German")]
    for name, a, t in people:
        out.append({"prompt": t.format(name), "answer": a, "relation": "person"})
    general = [("The largest planet in the solar system is", "Jupiter"), ("The closest star to the Earth is the", "Sun"),
               ("The chemical symbol for gold is", "Au"), ("The chemical symbol for water is", "H2O"),
               ("Water freezes at a temperature of", "0"), ("The color of the sky on a clear day is", "blue"),
               ("The color of grass is", "green"), ("There are seven days in a", "week"),
               ("There are twelve months in a", "year"), ("The first month of the year is", "January"),
               ("The last month of the year is", "December"), ("The day after Monday is", "Tuesday"),
               ("The day after Friday is", "Saturday"), ("The opposite of hot is", "cold"),
               ("The opposite of up is", "down"), ("The opposite of black is", "white"),
               ("A baby cat is called a", "kitten"), ("A baby dog is called a", "puppy"),
               ("The longest river in Africa is the", "Nile"), ("The largest ocean on Earth is the", "Pacific"),
               ("The tallest mountain in the world is Mount", "Everest"), ("The Earth orbits the", "Sun"),
               ("The planet known as the Red Planet is", "Mars"), ("Two plus two equals", "four"),
               ("The square root of nine is", "three"), ("Bees make", "honey"), ("Cows give us", "milk"),
               ("The author of Romeo and Juliet is William", "Shakespeare"),
               ("The Mona Lisa was painted by Leonardo", "da Vinci"), ("Honolulu is the capital of", "Hawaii"),
               ("The Great Wall is located in", "China"), ("The pyramids of Giza are in", "Egypt"),
               ("Mount Fuji is in", "Japan"), ("The Amazon rainforest is mostly in", "Brazil"),
               ("Kangaroos are native to", "Australia"), ("The Sahara is a large", "desert"),
               ("Penguins mostly live in the Southern", "Hemisphere"), ("The human heart pumps", "blood"),
               ("The freezing point of water in Fahrenheit is", "32"), ("Ice is frozen", "water")]
    for p, a in general:
        out.append({"prompt": p, "answer": a, "relation": "general"})
    return out


FACT_CANDIDATES = _facts()
