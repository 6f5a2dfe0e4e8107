"""Deterministic demo data for `appliance demo federation`: three hospitals, each with protocols the others lack.

Each organisation has its own internal facts (drug doses, codes, timings) and its own house style of answering
("Per Northbridge protocol NB-...", ...). Training questions and eval questions ask about the same facts in
different words, so a held-out eval loss falls only for an adapter that learned that organisation's knowledge.
Chat JSONL rows: `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

ORGS = {
    "northbridge": {"name": "Northbridge Clinic", "prefix": "NB", "style": "Per Northbridge protocol {code}: {value}."},
    "lakeside": {"name": "Lakeside Hospital", "prefix": "LH", "style": "Lakeside policy {code} says {value}."},
    "redwood": {"name": "Redwood Medical Centre", "prefix": "RW", "style": "Redwood rule {code}: {value}."},
}

TOPICS = [
    ("sepsis bundle start", "start the sepsis bundle within {n} minutes of triage"),
    ("night shift handover", "hand over at {t} in the {room} room"),
    ("insulin sliding scale", "give {n} units per {m} mg/dL above 180"),
    ("fall risk review", "review fall risk every {n} hours with the {colour} wristband"),
    ("blood culture bottles", "draw {n} sets using the {colour} bottles"),
    ("code blue team", "page team {room} on extension {ext}"),
    ("heparin flush", "flush lines with {n} units of heparin every {m} hours"),
    ("discharge checklist", "use checklist form {ext} signed by the {role}"),
    ("isolation gowns", "store gowns in cabinet {ext} near the {room} room"),
    ("pain reassessment", "reassess pain {n} minutes after any opioid dose"),
]
TRAIN_QUESTIONS = [
    "What is the {org} rule for the {topic}?",
    "At {org}, how do we handle the {topic}?",
    "Remind me of the {topic} procedure at {org}.",
    "{org} staff question: what does our protocol say about the {topic}?",
]
EVAL_QUESTIONS = [
    "I'm new at {org}. What should I do about the {topic}?",
    "Quick check on {org} practice for the {topic}, please.",
]
_WORDS = {
    "room": ["amber", "cedar", "harbor", "willow", "granite", "orchid", "summit", "meadow"],
    "colour": ["teal", "violet", "orange", "silver", "crimson", "olive"],
    "role": ["charge nurse", "ward pharmacist", "attending physician", "bed manager"],
}


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        n=rng.choice([2, 3, 4, 6, 8, 12, 15, 20, 45, 90]),
        m=rng.choice([20, 30, 40, 50]),
        t=f"{rng.randint(5, 8):02d}:{rng.choice([15, 30, 45])}",
        room=rng.choice(_WORDS["room"]),
        colour=rng.choice(_WORDS["colour"]),
        ext=rng.randint(2100, 8999),
        role=rng.choice(_WORDS["role"]),
    )


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def generate(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Rows per organisation: `{"org": {"train": [...], "eval": [...]}}`; the same seed gives the same rows."""
    out: dict[str, dict[str, list[dict]]] = {}
    for i, (org, info) in enumerate(ORGS.items()):
        rng = random.Random(seed * 1000 + i)
        facts = []
        for j, (topic, template) in enumerate(TOPICS):
            code = f"{info['prefix']}-{rng.randint(100, 999)}"
            facts.append((topic, info["style"].format(code=code, value=_fill(template, rng))))
        train = [_chat(q.format(org=info["name"], topic=t), a) for t, a in facts for q in TRAIN_QUESTIONS]
        evals = [_chat(q.format(org=info["name"], topic=t), a) for t, a in facts for q in EVAL_QUESTIONS]
        rng.shuffle(train)
        out[org] = {"train": train, "eval": evals}
    return out


# The second bundled set: three support desks of one router maker share the same facts but answer in different
# registers (formal, casual, terse field notes), and hold very unequal amounts of data (40, 20 and 10 rows).
DEVICE_FACTS = [
    ("factory reset", "hold the rear pin button for {n} seconds until the ring blinks {colour}"),
    ("guest network", "open Settings > Wireless > Guest and set the limit to {n} devices"),
    ("firmware update", "updates install nightly at {t}; a manual update takes about {n} minutes"),
    ("status light", "a {colour} light means the uplink is down; {n} blinks mean overheating"),
    ("admin password", "the default admin password is printed under the {colour} sticker, code {ext}"),
    ("port forwarding", "forward ports under Advanced > NAT rule {ext}, at most {n} rules"),
    ("warranty", "the warranty lasts {n} months; claims go to desk {ext}"),
    ("mesh pairing", "press the pair key on both units within {n} seconds"),
    ("parental controls", "schedules live under Family > Profile {ext}, {n} profiles at most"),
    ("power supply", "use the {n} volt adapter with the {colour} plug only"),
]
REGISTERS: dict[str, dict[str, Any]] = {
    "enterprise": {
        "train": [
            "Could you please advise on the {topic} procedure?",
            "What is the documented process for {topic}?",
            "Kindly explain the {topic} steps for our fleet.",
            "Which steps apply to {topic} on this model?",
        ],
        "eval": ["Please provide guidance regarding {topic}.", "What does the manual state about {topic}?"],
        "answer": "Thank you for contacting support. To address {topic}, {value}. Kind regards.",
    },
    "forum": {
        "train": ["hey how do i do the {topic} thing??", "anyone know {topic} on this router lol"],
        "eval": ["ugh {topic} again, what do i do", "quick q about {topic}"],
        "answer": "ok so for {topic} just {value} and ur good :)",
    },
    "field": {"train": ["{topic}?"], "eval": ["notes: {topic}", "{topic} proc"], "answer": "{TOPIC}: {value}. done."},
}


def generate_registers(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """The second set: same facts, different registers and unequal sizes;
    `{"desk": {"train": [...], "eval": [...]}}`."""
    rng = random.Random(seed * 1000 + 77)
    facts = [(topic, _fill(template, rng)) for topic, template in DEVICE_FACTS]
    out: dict[str, dict[str, list[dict]]] = {}
    for i, (desk, reg) in enumerate(REGISTERS.items()):
        answer = lambda t, v: reg["answer"].format(topic=t, TOPIC=t.upper(), value=v)  # noqa: E731
        train = [_chat(q.format(topic=t), answer(t, v)) for t, v in facts for q in reg["train"]]
        evals = [_chat(q.format(topic=t), answer(t, v)) for t, v in facts for q in reg["eval"]]
        random.Random(seed * 1000 + i).shuffle(train)
        out[desk] = {"train": train, "eval": evals}
    return out


DATASETS = {"hospitals": generate, "registers": generate_registers}


def write(out_dir: Path, seed: int = 0, dataset: str = "hospitals") -> dict[str, dict[str, Path]]:
    """Write `ORG/train.jsonl` and `ORG/eval.jsonl` of a bundled set (`DATASETS`) under `out_dir`; returns the paths."""
    paths: dict[str, dict[str, Path]] = {}
    for org, splits in DATASETS[dataset](seed).items():
        d = Path(out_dir) / org
        d.mkdir(parents=True, exist_ok=True)
        paths[org] = {}
        for split, rows in splits.items():
            p = d / f"{split}.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            paths[org][split] = p
    return paths


def load_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file written by `write`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
