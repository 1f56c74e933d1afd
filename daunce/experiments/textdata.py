"""Text data for the LLM experiments: examples are dicts ``{"prompt", "response", ...}``.

Offline (default profile):
* ``champ_math``: CHAMP's competition-math problems (``champ-dataset``) as problem -> worked solution
  ending in the final answer; the offline stand-in for MATH.
* ``instruction_following``: prompts carrying IFEval-type verifiable constraints, built from
  templates over a set of topics; each response is constructed to satisfy the constraint and is
  verified with IFEval's own checker (``if-verifiable``). Shipped pre-built (and re-verified on
  load) in ``daunce/experiments/data_files/if_synthetic.jsonl``; ``build_instruction_following`` regenerates it.

Paper profile (needs the hub, or local copies in the same formats; ``PAPER_DATA`` and ``paper_sets``):
* ``load_math``: MATH (Hendrycks et al.): a folder of per-problem json files (the original release),
  a .json/.jsonl/.parquet file, or a hub dataset id; fields problem/solution/level/type.
* ``load_ifeval``: IFEval (google/IFEval, 541 prompts): fields key/prompt/instruction_id_list/kwargs, joined
  with a responses file (prompt/response, e.g. IFEval's ``input_response_data_*.jsonl``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

DATA_FILES = Path(__file__).parent / "data_files"
IF_FILE = DATA_FILES / "if_synthetic.jsonl"


# ---------------------------------------------------------------------------------------- split
def split(examples: Sequence[dict], n_train: int, n_query: int, seed: int = 0,
          group_key: Optional[str] = None, min_query_groups: int = 1) -> tuple[list, list]:
    """A random ``(train, query)`` split of ``n_train`` and ``n_query`` examples. With ``group_key``, queries come
    from groups (e.g. topics) that do not occur in the training set, so a query never has a near-copy in training:
    the groups, shuffled from ``seed``, are taken for the queries until they hold ``n_query`` examples and number at
    least ``min(min_query_groups, n_query)``, and the queries are dealt from them in turn (one group's after
    another's, each group's in a random order), so they spread evenly over those groups (their other examples are
    used nowhere); the training examples are drawn from the other groups. Raises ValueError when the examples are too
    few, or the groups too few to leave a training group beside ``min_query_groups`` query groups."""
    rng = random.Random(seed)
    ex = list(examples)
    if group_key is None:
        rng.shuffle(ex)
        if n_train + n_query > len(ex):
            raise ValueError(f"asked for {n_train}+{n_query} examples, only {len(ex)} exist")
        return ex[:n_train], ex[n_train : n_train + n_query]
    missing = [i for i, e in enumerate(ex) if group_key not in e]
    if missing:
        raise ValueError(f"split by {group_key!r}: example {missing[0]} has no {group_key!r} field")
    groups = sorted({e[group_key] for e in ex})
    rng.shuffle(groups)
    need = min(min_query_groups, n_query)
    if need >= len(groups):
        raise ValueError(f"split by {group_key!r}: the queries should come from at least {need} groups and the "
                         f"training set from others, but the examples hold only {len(groups)} groups")
    members = {g: [e for e in ex if e[group_key] == g] for g in groups}
    chosen, held = [], 0
    for g in groups[:-1]:                        # the last group is always left to the training set
        if held >= n_query and len(chosen) >= need:
            break
        chosen.append(g)
        held += len(members[g])
    for g in chosen:
        rng.shuffle(members[g])
    query = [members[g][i] for i in range(max((len(members[g]) for g in chosen), default=0)) for g in chosen
             if i < len(members[g])][:n_query]   # round by round: one example of each query group
    train = [e for g in groups if g not in chosen for e in members[g]]
    rng.shuffle(query)
    rng.shuffle(train)
    if len(query) < n_query or len(train) < n_train:
        raise ValueError(f"not enough examples for {n_train} train + {n_query} query: the {len(chosen)} query "
                         f"groups hold {held}, the other {len(groups) - len(chosen)} groups {len(train)}")
    return train[:n_train], query


# ----------------------------------------------------------------------------------------- math
def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in a MATH solution."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return None


def champ_math() -> list[dict]:
    """CHAMP's 270 problems: ``{"prompt": problem, "response": worked solution + final answer,
    "answer", "category", "id"}`` (offline, from the champ-dataset package)."""
    import champ_dataset

    out = []
    for pid, p in champ_dataset.load("v0").problems.items():
        steps = " ".join(s.text for s in p.solution.steps)
        out.append({"id": pid, "prompt": p.text, "answer": p.answer, "category": p.category,
                    "response": f"{steps}\nThe final answer is $\\boxed{{{p.answer}}}$."})
    return out


def _math_record(r: dict) -> dict:
    sol = r["solution"]
    return {"prompt": r["problem"], "response": sol, "answer": last_boxed(sol),
            "level": r.get("level"), "category": r.get("type")}


def load_math(source: str = "EleutherAI/hendrycks_math", split_name: str = "train",
              subjects: Optional[Sequence[str]] = None) -> list[dict]:
    """MATH examples ``{"prompt", "response", "answer", "level", "category"}``.

    ``source``: a folder of the original release (``<split>/<type>/<id>.json`` or any ``*.json``
    below it), a ``.json``/``.jsonl``/``.parquet`` file with fields problem/solution/level/type, or a hub
    dataset id (``EleutherAI/hendrycks_math``, one config per subject; needs the internet).
    """
    p = Path(source)
    if p.is_dir():
        files = sorted((p / split_name).rglob("*.json")) if (p / split_name).is_dir() else sorted(p.rglob("*.json"))
        if not files:
            raise FileNotFoundError(f"MATH folder {p} holds no problem files: expected "
                                    f"{split_name}/<subject>/<id>.json (the original release), each "
                                    '{"problem", "level", "type", "solution"}')
        return [_math_record(json.loads(f.read_text())) for f in files]
    if p.is_file():
        return [_math_record(r) for r in _read_records(p)]
    import datasets

    subjects = subjects or ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                            "number_theory", "prealgebra", "precalculus"]
    out = []
    for s in subjects:
        out.extend(_math_record(r) for r in datasets.load_dataset(source, s, split=split_name))
    return out


def _read_records(path: Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


# ------------------------------------------------------------------------------------- IFEval
def _plain(v):
    """numpy arrays / None-filled dicts (as parquet gives them) -> plain python."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def load_ifeval(source: str = "google/IFEval", responses: Optional[str] = None,
                require_response: bool = True) -> list[dict]:
    """IFEval examples ``{"prompt", "response", "key", "instruction_id_list", "kwargs"}``.

    ``source``: a .jsonl/.json/.parquet file with IFEval's fields, or a hub id (needs the internet).
    IFEval has no reference responses; ``responses`` names a .jsonl file of ``{"prompt", "response"}``
    (IFEval ships such files of model outputs) joined by prompt. With ``require_response`` examples
    without a (non-empty) response are dropped, and a missing ``responses`` (None, or no such file), or one that
    answers none of the prompts, raises an error that names the file and what it must hold.
    """
    if require_response and responses is None and not (Path(source).is_file() and _has_responses(Path(source))):
        raise ValueError(f"IFEval ({source}) has no reference responses: pass responses=<{RESPONSES_FORMAT}> "
                         f"(e.g. {IFEVAL_RESPONSES_ORIGIN}), or require_response=False")
    if responses is not None and not Path(responses).is_file():
        raise FileNotFoundError(f"IFEval responses file {responses} not found: it must hold {RESPONSES_FORMAT} "
                                f"(e.g. {IFEVAL_RESPONSES_ORIGIN})")
    p = Path(source)
    if p.is_file():
        rows = _read_records(p)
    else:
        import datasets

        rows = list(datasets.load_dataset(source, split="train"))
    resp = {}
    if responses is not None:
        for i, r in enumerate(_read_records(Path(responses))):
            missing = [k for k in ("prompt", "response") if k not in r]
            if missing:
                raise ValueError(f"IFEval responses file {responses}, record {i}: no {missing} field; the file must "
                                 f"hold {RESPONSES_FORMAT}")
            resp[r["prompt"]] = r["response"]
    out = []
    for r in rows:
        ex = {"key": r.get("key"), "prompt": r["prompt"], "instruction_id_list": list(_plain(r["instruction_id_list"])),
              "kwargs": [_plain(k) or {} for k in _plain(r["kwargs"])],
              "response": r.get("response", resp.get(r["prompt"]))}
        if require_response and not (ex["response"] or "").strip():
            continue
        out.append(ex)
    if require_response and rows and not out:
        raise ValueError(f"IFEval responses file {responses or source} answers none of the {len(rows)} prompts of "
                         f"{source}: it must hold {RESPONSES_FORMAT}, with IFEval's prompts verbatim")
    return out


def _has_responses(path: Path) -> bool:
    """Whether the records of an IFEval-format file carry their own ``response`` field."""
    rows = _read_records(path)
    return bool(rows) and "response" in rows[0]


# ------------------------------------------------------------------------------------ paper profile
#: The real sizes: MATH's training split (7,500 problems over 7 subjects) and IFEval's prompts.
MATH_TRAIN_PROBLEMS = 7500
IFEVAL_PROMPTS = 541
RESPONSES_FORMAT = 'a .jsonl file, one {"prompt": <IFEval prompt, verbatim>, "response": <text>} per line'
#: Where the `paper` profile's IFEval responses come from: IFEval has prompts and checkers only, so the profile
#: fine-tunes on the responses of a stronger model that IFEval's own repository ships for all 541 prompts.
IFEVAL_RESPONSES_ORIGIN = ("GPT-4's responses to IFEval's 541 prompts, shipped with IFEval "
                           "(google-research/google-research, instruction_following_eval/data/"
                           "input_response_data_gpt4_20231107_145030.jsonl)")


@dataclass(frozen=True)
class PaperData:
    """Where the `paper` profile's text data comes from (notebook 03) and how much of it each set uses.

    Both sets, math and instruction following, take ``n_train`` training examples and ``n_query`` queries, disjoint,
    drawn at random from MATH's training split and from IFEval's 541 prompts; IFEval's bound the sizes.
    ``ifeval_responses`` is the responses file the instruction set fine-tunes on: GPT-4's responses that IFEval's
    repository ships (``IFEVAL_RESPONSES_ORIGIN``), the paper's set-up being a fine-tune on prompt/response pairs. It is
    not shipped here: put it at that path (a relative path is read from the repository's root, ``data/`` is ignored
    by git) or name another file of the same format.
    """

    n_train: int = 400
    n_query: int = 100
    math_source: str = "EleutherAI/hendrycks_math"
    ifeval_source: str = "google/IFEval"
    ifeval_responses: str = "data/ifeval/input_response_data_gpt4_20231107_145030.jsonl"

    def __post_init__(self):
        if self.n_train < 1 or self.n_query < 1:
            raise ValueError(f"n_train and n_query must be positive, got {self.n_train} and {self.n_query}")
        if self.n_train + self.n_query > IFEVAL_PROMPTS:
            raise ValueError(f"IFEval has {IFEVAL_PROMPTS} prompts: n_train + n_query = {self.n_train} + "
                             f"{self.n_query} = {self.n_train + self.n_query} does not fit")


PAPER_DATA = PaperData()


def paper_sets(data: PaperData = PAPER_DATA, seed: int = 0) -> dict[str, tuple[list[dict], list[dict]]]:
    """The `paper` profile's sets: ``{"math": (train, query), "instr": (train, query)}``, each a disjoint random
    split of ``data.n_train`` training examples and ``data.n_query`` queries (examples as ``load_math`` and
    ``load_ifeval`` give them). Raises, naming the file, when the IFEval responses are missing or answer too few
    prompts for the split."""
    from .paths import repo_root

    responses = Path(data.ifeval_responses)
    if not responses.is_absolute():
        responses = repo_root() / responses
    instr_all = load_ifeval(data.ifeval_source, responses=str(responses))  # first: it fails fast on the responses
    need = data.n_train + data.n_query
    if len(instr_all) < need:
        raise ValueError(f"IFEval responses file {responses} answers {len(instr_all)} of IFEval's prompts; the split "
                         f"needs {need} ({data.n_train} train + {data.n_query} query)")
    math_all = load_math(data.math_source)
    return {"math": split(math_all, data.n_train, data.n_query, seed=seed),
            "instr": split(instr_all, data.n_train, data.n_query, seed=seed)}


def patch_nltk_offline() -> None:
    """Make if-verifiable's checkers run without nltk's downloadable data (punkt): plain Punkt
    sentence splitting and Treebank word tokenisation (the workaround of docs/offline-assets.md)."""
    import nltk
    from if_verifiable.ifeval import instructions_util

    try:  # langdetect (used by the case checkers) is random unless seeded
        from langdetect import DetectorFactory

        DetectorFactory.seed = 0
    except ImportError:
        pass
    instructions_util._get_sentence_tokenizer = lambda: nltk.tokenize.punkt.PunktSentenceTokenizer()
    nltk.word_tokenize = lambda t, *a, **k: nltk.tokenize.TreebankWordTokenizer().tokenize(t)


def check_instructions(example: dict, response: Optional[str] = None) -> bool:
    """True if ``response`` (default: the example's) passes every IFEval instruction of the example
    (strict mode, IFEval's own checkers from if-verifiable)."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    patch_nltk_offline()
    sample = IFEvalSample(key=example.get("key", 0), prompt=example["prompt"],
                          instruction_id_list=list(example["instruction_id_list"]),
                          kwargs=[dict(k) for k in example["kwargs"]])
    text = example["response"] if response is None else response
    _, scores = evaluate_output_for_sample("ifeval", sample, text)
    return scores.binary_strict == 1.0


# --------------------------------------------------------------- synthetic instruction following
TOPICS = {
    "honeybees": ["Honeybees live in colonies ruled by a single queen.",
                  "Worker bees collect nectar and pollen from flowers.",
                  "Their dance tells other bees where food can be found."],
    "volcanoes": ["A volcano is an opening in the crust of the Earth.",
                  "Molten rock called magma rises from deep below.",
                  "Some eruptions are gentle while others are explosive."],
    "the moon": ["The Moon orbits the Earth about once a month.",
                 "Its gravity pulls on the oceans and causes tides.",
                 "Astronauts first walked on it in the year 1969."],
    "bicycles": ["A bicycle turns the power of your legs into motion.",
                 "Gears let the rider climb hills with less effort.",
                 "Cycling is cheap and clean and good for your health."],
    "coffee": ["Coffee is brewed from the roasted seeds of a plant.",
               "It contains caffeine which keeps people awake.",
               "Many people drink a cup every morning."],
    "rain forests": ["Rain forests receive heavy rain through the whole year.",
                     "They hold more than half of all animal species.",
                     "Cutting them down releases carbon into the air."],
    "chess": ["Chess is a board game for two players.",
              "Each side starts with sixteen pieces.",
              "The goal is to trap the king of the opponent."],
    "penguins": ["Penguins are birds that cannot fly.",
                 "They swim fast and hunt fish in cold seas.",
                 "Emperor penguins keep their eggs warm on their feet."],
    "solar power": ["Solar panels turn sunlight into electricity.",
                    "The energy is clean and never runs out.",
                    "Prices of panels have fallen a lot in recent years."],
    "libraries": ["A library lends books to the public for free.",
                  "Many libraries also offer computers and quiet rooms.",
                  "Librarians help people find what they need."],
    "the ocean": ["The ocean covers most of the surface of the Earth.",
                  "It produces much of the oxygen that we breathe.",
                  "Its deepest parts are still barely explored."],
    "bread": ["Bread is made from flour and water and yeast.",
              "The yeast makes the dough rise before baking.",
              "People have baked bread for thousands of years."],
    "elephants": ["Elephants are the largest animals living on land.",
                  "They use their trunks to drink and to grab food.",
                  "Herds are led by the oldest female."],
    "trains": ["Trains carry people and goods on steel rails.",
               "Fast trains can travel at over three hundred kilometres an hour.",
               "They use less fuel per passenger than cars."],
    "gardening": ["Gardening means growing plants for food or beauty.",
                  "Plants need sun and water and good soil.",
                  "Many people find it calming to work in a garden."],
    "the internet": ["The internet links computers all over the world.",
                     "It lets people send messages in an instant.",
                     "It began as a small research network."],
    "football": ["Football is played by two teams of eleven players.",
                 "Players try to kick the ball into the goal.",
                 "The World Cup is watched by billions of fans."],
    "clouds": ["Clouds are made of tiny drops of water or ice.",
               "They form when warm moist air rises and cools.",
               "Dark clouds often bring rain or storms."],
    "music": ["Music is sound arranged in time.",
              "People make it with voices and instruments.",
              "Every culture in the world has its own music."],
    "owls": ["Owls are birds that hunt mostly at night.",
             "Their large eyes help them see in the dark.",
             "They fly almost without a sound."],
    "deserts": ["Deserts get very little rain each year.",
                "Days can be hot while nights are cold.",
                "Cactus plants store water in their thick stems."],
    "recycling": ["Recycling turns waste into new products.",
                  "Paper and glass and metal can be used again.",
                  "It saves energy and reduces the amount of trash."],
    "dinosaurs": ["Dinosaurs lived on Earth for millions of years.",
                  "Some were as small as chickens and others were huge.",
                  "Birds are their living descendants."],
    "sleep": ["Sleep lets the body and the brain recover.",
              "Adults need about eight hours each night.",
              "Too little sleep makes it hard to focus."],
    "tea": ["Tea is made by pouring hot water over dried leaves.",
            "It was first drunk in China long ago.",
            "Green tea and black tea come from the same plant."],
    "rivers": ["A river is a stream of fresh water flowing to the sea.",
               "Rivers shape valleys over long periods of time.",
               "Many cities were built on their banks."],
    "robots": ["Robots are machines that can carry out tasks on their own.",
               "Factories use them to build cars and phones.",
               "Some robots can now walk and talk."],
    "snow": ["Snow falls when the air is cold enough to freeze water.",
             "Every snowflake has six sides.",
             "Fresh snow reflects most of the sunlight."],
    "museums": ["A museum keeps and shows objects of art or history.",
                "Visitors can learn about the past by looking at them.",
                "Some museums are free to enter."],
    "wolves": ["Wolves live and hunt in family groups called packs.",
               "They talk to each other by howling.",
               "Dogs were bred from wolves long ago."],
    "vaccines": ["Vaccines train the immune system to fight a disease.",
                 "They have saved millions of lives.",
                 "Most are given as a small injection."],
    "kites": ["A kite is a light frame covered with cloth or paper.",
              "The wind lifts it high into the sky.",
              "A string lets the flyer steer it."],
}

_TASKS = ["Write a short note about {t}.", "Tell me a few facts about {t}.", "Describe {t} in a few sentences."]


@dataclass(frozen=True)
class _Instruction:
    id: str
    text: str
    kwargs: dict


def _instructions(topic: str, facts: list[str], rng: random.Random):
    """(instruction, response) pairs: each response built to satisfy its instruction."""
    body = " ".join(facts)
    kw = sorted({w.lower() for w in re.findall(r"[A-Za-z]{5,}", body)})
    k1, k2 = rng.sample(kw, 2)
    end = "Is there anything else I can help with?"
    title = topic.title()
    return [
        (_Instruction("change_case:english_lowercase",
                      "Your entire response should be in English, and in all lowercase letters. "
                      "No capital letters are allowed.", {}), body.lower()),
        (_Instruction("change_case:english_capital",
                      "Your entire response should be in English, and in all capital letters.", {}), body.upper()),
        (_Instruction("punctuation:no_comma", "In your entire response, refrain from the use of any commas.", {}),
         body.replace(",", "")),
        (_Instruction("detectable_format:title",
                      "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
                      {}), f"<<{title}>>\n{body}"),
        (_Instruction("startend:quotation", "Wrap your entire response with double quotation marks.", {}),
         f'"{body}"'),
        (_Instruction("startend:end_checker",
                      f"Finish your response with this exact phrase {end} No other words should follow this phrase.",
                      {"end_phrase": end}), f"{body} {end}"),
        (_Instruction("detectable_content:postscript",
                      "At the end of your response, please explicitly add a postscript starting with P.S.",
                      {"postscript_marker": "P.S."}),
         f"{facts[0]} {facts[1]}\n\nP.S. {facts[2]}"),
        (_Instruction("detectable_format:number_bullet_lists",
                      "Your answer must contain exactly 3 bullet points. Use the markdown bullet points such as:\n"
                      "* This is point 1.\n* This is point 2", {"num_bullets": 3}),
         "\n".join(f"* {f}" for f in facts)),
        (_Instruction("detectable_format:json_format",
                      "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.", {}),
         json.dumps({"topic": topic, "facts": facts})),
        (_Instruction("length_constraints:number_paragraphs",
                      "There should be 2 paragraphs. Paragraphs and only paragraphs are separated with each other "
                      "by the markdown divider: ***", {"num_paragraphs": 2}),
         f"{facts[0]} {facts[1]}\n***\n{facts[2]}"),
        (_Instruction("keywords:existence", f"Include keywords {k1}, {k2} in the response.",
                      {"keywords": [k1, k2]}), body),
        (_Instruction("detectable_format:number_highlighted_sections",
                      "Highlight at least 2 sections in your answer with markdown, i.e. *highlighted section*.",
                      {"num_highlights": 2}),
         f"*{facts[0]}* {facts[1]} *{facts[2]}*"),
    ]


def build_instruction_following(seed: int = 0, verify: bool = True) -> list[dict]:
    """Every (topic, instruction type) pair: ``{"prompt", "response", "topic", "instruction_id_list",
    "kwargs", "key"}``. Prompts are built from templates; responses satisfy the constraint by
    construction and (``verify``) are checked with IFEval's checker; the few that the checker
    rejects (its language detector on some all-caps texts) are left out."""
    rng = random.Random(seed)
    out = []
    for topic, facts in TOPICS.items():
        for ins, resp in _instructions(topic, facts, rng):
            task = rng.choice(_TASKS).format(t=topic)
            ex = {"key": len(out), "topic": topic, "prompt": f"{task} {ins.text}", "response": resp,
                  "instruction_id_list": [ins.id], "kwargs": [ins.kwargs]}
            if verify and not check_instructions(ex):
                continue  # e.g. IFEval's language detector does not take an all-caps text for English
            ex["key"] = len(out)
            out.append(ex)
    return out


def instruction_following(path: Optional[Path] = None, verify: bool = True) -> list[dict]:
    """The synthetic instruction-following set: read from ``daunce/experiments/data_files/if_synthetic.jsonl``
    (rebuilt if missing) and, with ``verify``, every response re-checked with IFEval's checker."""
    path = Path(path or IF_FILE)
    if path.exists():
        exs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        exs = build_instruction_following(verify=False)
    if verify:
        bad = [e["key"] for e in exs if not check_instructions(e)]
        if bad:
            raise AssertionError(f"{len(bad)} responses fail IFEval's checker: keys {bad[:5]}")
    return exs
