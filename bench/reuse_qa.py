"""QA sets for the reuse-anywhere benchmarks: 12 short documents with unambiguous facts.

Each document describes one fictional place, person, company or thing, with names, years and
numbers that exist nowhere else, so an answer is right only if the model read the document.
Every document has three single-document questions; twelve two-document questions ask for one
fact from each of two documents. Every question is served with three retrieved documents (its
document(s) plus distractors), and across the set every document appears at every position.

`stream()` is the one-question-at-a-time stream: the 36 single-document questions and the 12
two-document ones interleaved, in a fixed order. `accuracy_set()` asks every question of the
stream with its three documents in three rotations (144 questions), so each question's
document(s) sit at every position. This module only holds data and scoring; the
benchmarks run it (bench_reuse_quality.py, bench_reuse_speed.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM = (
    "You are a precise assistant. Answer the question using only the documents in the "
    "conversation. Reply with the answer only: a name, a number or a few words, no full sentence."
)

DOCS = [
    # 0
    "Velmora is a fishing town on the north coast of the island of Tarsk. It was founded in "
    "1432 by a sailor named Oddvar Brenn, who built the first stone harbour wall. Today about "
    "7,800 people live in Velmora. The town is known for its smoked eel, which is packed in "
    "wooden boxes painted bright orange. Every August the town holds the Lantern Regatta, a "
    "night race of small boats around the lighthouse. The lighthouse itself, called the Grey "
    "Needle, is 41 metres tall and was built in 1871.",
    # 1
    "The Quorrin Institute is a research library in the mountain city of Halvek. It was "
    "opened in 1908 by the chemist Ilse Marrat, who left her fortune to build it. The library "
    "holds about 2.3 million books and the largest collection of salt-trade maps in the world. "
    "Its reading room has a glass ceiling shaped like an eight-pointed star. The current "
    "director is Tomas Ferrow. Visitors must wear white cotton gloves to touch the maps, and "
    "the building is closed every Tuesday.",
    # 2
    "Brassfeld Motors is a small car maker based in the river town of Ulmsted. It was started "
    "in 1953 by the brothers Karl and Emil Dussen in a former bicycle workshop. Its best-known "
    "model is the Kestrel, a two-seat electric roadster with a top speed of 182 kilometres per "
    "hour. The company employs 640 people and builds about 3,000 cars a year. All Brassfeld "
    "cars are painted at the factory in a colour called Ulmsted green. The firm's logo is a "
    "silver hare.",
    # 3
    "Mount Irrik is the highest peak of the Sorrow Range, rising to 5,116 metres. It was first "
    "climbed in 1936 by the guide Anja Voss and the painter Leo Harte. The mountain has three "
    "glaciers; the largest, the Pale Tongue, is about nine kilometres long. A small hut for "
    "climbers, the Voss Hut, stands at 3,900 metres. Local herders call the mountain the Old "
    "Ram because of the curved shape of its summit ridge. Snow covers the summit all year.",
    # 4
    "The Tellwyn Sunbird is a small bird that lives only in the cloud forests of the Amaro "
    "Valley. It was first described in 1889 by the naturalist Perpetua Lowe. The male has a "
    "copper-red throat and a blue tail, and the female is plain brown. A grown bird weighs "
    "about nine grams. The sunbird feeds on the nectar of the ghost orchid and builds its nest "
    "from moss and spider silk. Around 4,000 pairs are thought to survive.",
    # 5
    "Harrowmere Cheese is a hard sheep's cheese made in the village of Harrowmere. The recipe "
    "dates from 1604, when it was written down by the abbess Maud Crane. Each wheel weighs 12 "
    "kilograms and is aged for at least 18 months in limestone caves. The rind is rubbed with "
    "juniper ash, which turns it black. About 900 wheels are made each year by four family "
    "farms. The cheese won the gold medal at the Fenwick food fair in 2019.",
    # 6
    "The Orlen Bridge crosses the Vask River at the city of Pell. It was designed by the "
    "engineer Greta Solm and opened in 1898. The bridge is 1,240 metres long and rests on "
    "eleven granite piers. It carries two railway tracks on its lower deck and a road on its "
    "upper deck. The iron of the bridge is painted dark red every seven years. A bronze statue "
    "of a heron stands at its southern end.",
    # 7
    "Sabine Okonkwo-Reyes is a composer born in 1967 in the port city of Calder. She studied "
    "the organ before she turned to writing music for films. Her best-known work is the Salt "
    "Wind Symphony, first played in 1999 by the Calder Philharmonic. She has written the music "
    "for 23 films. She plays a cello made in 1721 that she calls Margit. In 2014 she founded a "
    "free music school for children called the Open Reed.",
    # 8
    "Dovrin is a board game invented in 1961 by the schoolteacher Hal Pemberton. It is played "
    "on a board of 81 hexagons with pieces shaped like towers and foxes. Each player starts "
    "with 14 pieces. The goal is to move your fox into the centre hexagon, called the Well. "
    "Dovrin is most popular in the town of Kessing, which holds a world championship every "
    "spring. The current champion is Mira Tollan, who has won the title six times.",
    # 9
    "The Nallow Tea Estate lies on the eastern slopes of the Brenna Hills. It was planted in "
    "1877 by the merchant Josiah Kell. The estate covers 310 hectares and employs about 450 "
    "pickers. Its most famous tea is called Morning Ember, a black tea with a smoky taste. The "
    "leaves are dried over fires of cedar wood. The estate's packing house has a clock tower "
    "painted yellow, and its tea is sold in tins with a picture of a white elephant.",
    # 10
    "The Zephyr 9 is a weather satellite launched in 2011 from the Corran space centre. It was "
    "built by a team led by the engineer Ravi Anand. The satellite circles the Earth at a "
    "height of 830 kilometres and weighs 1,450 kilograms. Its main camera can see clouds as "
    "small as 250 metres across. The satellite sends its pictures to a ground station in the "
    "town of Fiskby. It was planned to work for seven years but it is still working.",
    # 11
    "Saint Olwen's Fair is a market held every October in the walled town of Drummore. It was "
    "first held in 1350, when the town received a royal charter from King Aldric. The fair "
    "lasts nine days and draws about 60,000 visitors. The most famous stall sells hot pear "
    "cakes baked in copper pans. On the last night a giant figure of straw, called the Old "
    "Man of Drummore, is carried through the streets. The fair's symbol is a blue key.",
]

# (document, question, accepted answers): three per document
SINGLE = [
    (0, "Who founded Velmora?", ["Oddvar Brenn"]),
    (0, "How tall is the Grey Needle lighthouse?", ["41"]),
    (0, "What colour are the boxes of Velmora's smoked eel?", ["orange"]),
    (1, "Who opened the Quorrin Institute?", ["Ilse Marrat"]),
    (1, "Who is the current director of the Quorrin Institute?", ["Tomas Ferrow"]),
    (1, "On which day is the Quorrin Institute closed?", ["Tuesday"]),
    (2, "What is the best-known model of Brassfeld Motors?", ["Kestrel"]),
    (2, "In which year was Brassfeld Motors started?", ["1953"]),
    (2, "What animal is on the Brassfeld Motors logo?", ["hare"]),
    (3, "How high is Mount Irrik?", ["5,116", "5116"]),
    (3, "What is the largest glacier on Mount Irrik called?", ["Pale Tongue"]),
    (3, "What do local herders call Mount Irrik?", ["Old Ram"]),
    (4, "Who first described the Tellwyn Sunbird?", ["Perpetua Lowe"]),
    (4, "What colour is the throat of the male Tellwyn Sunbird?", ["copper"]),
    (4, "On the nectar of which flower does the Tellwyn Sunbird feed?", ["ghost orchid"]),
    (5, "Who wrote down the recipe of Harrowmere Cheese?", ["Maud Crane"]),
    (5, "How much does a wheel of Harrowmere Cheese weigh?", ["12"]),
    (5, "What is the rind of Harrowmere Cheese rubbed with?", ["juniper"]),
    (6, "Who designed the Orlen Bridge?", ["Greta Solm"]),
    (6, "How long is the Orlen Bridge?", ["1,240", "1240"]),
    (6, "What statue stands at the southern end of the Orlen Bridge?", ["heron"]),
    (7, "In which city was Sabine Okonkwo-Reyes born?", ["Calder"]),
    (7, "What is the best-known work of Sabine Okonkwo-Reyes?", ["Salt Wind"]),
    (7, "What does Sabine Okonkwo-Reyes call her cello?", ["Margit"]),
    (8, "Who invented the game Dovrin?", ["Hal Pemberton"]),
    (8, "What is the centre hexagon of a Dovrin board called?", ["Well"]),
    (8, "Who is the current Dovrin champion?", ["Mira Tollan"]),
    (9, "Who planted the Nallow Tea Estate?", ["Josiah Kell"]),
    (9, "What is the most famous tea of the Nallow Tea Estate called?", ["Morning Ember"]),
    (9, "What animal is pictured on the tins of Nallow tea?", ["elephant"]),
    (10, "Who led the team that built the Zephyr 9 satellite?", ["Ravi Anand"]),
    (10, "In which year was the Zephyr 9 satellite launched?", ["2011"]),
    (10, "In which town is the ground station of the Zephyr 9 satellite?", ["Fiskby"]),
    (11, "In which town is Saint Olwen's Fair held?", ["Drummore"]),
    (11, "What is sold at the most famous stall of Saint Olwen's Fair?", ["pear"]),
    (11, "What is the symbol of Saint Olwen's Fair?", ["blue key", "key"]),
]

# (document a, document b, question, accepted answers for a, for b)
DOUBLE = [
    (
        0,
        6,
        "Who founded Velmora, and who designed the Orlen Bridge?",
        ["Oddvar Brenn"],
        ["Greta Solm"],
    ),
    (
        1,
        9,
        "Who opened the Quorrin Institute, and who planted the Nallow Tea Estate?",
        ["Ilse Marrat"],
        ["Josiah Kell"],
    ),
    (
        2,
        10,
        "Which animal is on the Brassfeld logo, and in which town is the Zephyr 9 ground station?",
        ["hare"],
        ["Fiskby"],
    ),
    (
        3,
        7,
        "Who climbed Mount Irrik with Leo Harte, and where was Sabine Okonkwo-Reyes born?",
        ["Anja Voss"],
        ["Calder"],
    ),
    (
        4,
        8,
        "Who first described the Tellwyn Sunbird, and who invented Dovrin?",
        ["Perpetua Lowe"],
        ["Hal Pemberton"],
    ),
    (
        5,
        11,
        "Who wrote down the Harrowmere Cheese recipe, and where is Saint Olwen's Fair held?",
        ["Maud Crane"],
        ["Drummore"],
    ),
    (
        6,
        2,
        "Which statue stands by the Orlen Bridge, and what is Brassfeld's best-known car?",
        ["heron"],
        ["Kestrel"],
    ),
    (
        7,
        3,
        "What does Sabine Okonkwo-Reyes call her cello, and what do herders call Mount Irrik?",
        ["Margit"],
        ["Old Ram"],
    ),
    (
        8,
        0,
        "Who is the Dovrin champion, and what is the Velmora lighthouse called?",
        ["Mira Tollan"],
        ["Grey Needle"],
    ),
    (
        9,
        5,
        "What is the famous Nallow tea called, and what is Harrowmere Cheese's rind rubbed with?",
        ["Morning Ember"],
        ["juniper"],
    ),
    (
        10,
        4,
        "Who led the Zephyr 9 team, and what does the Tellwyn Sunbird feed on?",
        ["Ravi Anand"],
        ["ghost orchid"],
    ),
    (
        11,
        1,
        "What is the symbol of Saint Olwen's Fair, and who directs the Quorrin Institute?",
        ["key"],
        ["Tomas Ferrow"],
    ),
]


@dataclass(frozen=True)
class Question:
    """One question with its three retrieved documents, in retrieval order."""

    text: str
    docs: tuple[int, int, int]
    answers: tuple[tuple[str, ...], ...]  # every group must match (one for each document)
    kind: str  # "single" or "double"


def _single_questions() -> list[Question]:
    out = []
    for n, (doc, text, answers) in enumerate(SINGLE):
        slot = n % 3  # the three questions of a document put it at positions 0, 1, 2
        candidates = [(doc + 1 + 4 * slot) % 12, (doc + 7 + slot) % 12, (doc + 3) % 12]
        candidates += [(doc + 9) % 12, (doc + 5) % 12]
        docs = list(dict.fromkeys(d for d in candidates if d != doc))[:2]
        docs.insert(slot, doc)
        out.append(Question(text, tuple(docs), (tuple(answers),), "single"))
    return out


def _double_questions() -> list[Question]:
    out = []
    for n, (a, b, text, ans_a, ans_b) in enumerate(DOUBLE):
        other = next(d for d in ((a + 5) % 12, (a + 8) % 12, (a + 10) % 12) if d not in (a, b))
        orders = ([a, b, other], [other, a, b], [b, other, a])
        out.append(Question(text, tuple(orders[n % 3]), (tuple(ans_a), tuple(ans_b)), "double"))
    return out


def stream() -> list[Question]:
    """All 48 questions in the order they are asked one at a time: three single-document
    questions, then a two-document one, and so on."""
    singles, doubles = _single_questions(), _double_questions()
    out: list[Question] = []
    for i, d in enumerate(doubles):
        out.extend(singles[3 * i : 3 * i + 3])
        out.append(d)
    return out


def accuracy_set() -> list[Question]:
    """Every stream question with its documents rotated to each of the three positions."""
    out = []
    for q in stream():
        for r in range(3):
            docs = q.docs[r:] + q.docs[:r]
            out.append(Question(q.text, docs, q.answers, q.kind))
    return out


def facts_found(question: Question, answer: str) -> int:
    """How many answer groups (one per document asked about) have a match in the answer."""
    got = _norm(answer)
    return sum(any(_norm(a) in got for a in group) for group in question.answers)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().replace("\u2019", "'")).strip()


def is_correct(question: Question, answer: str) -> bool:
    """Every answer group has one accepted string in the answer (case-insensitive)."""
    return facts_found(question, answer) == len(question.answers)
