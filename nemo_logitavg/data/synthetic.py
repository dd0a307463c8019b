r"""Generated arithmetic and algebra word problems in MATH format, for the main job on one CPU machine.

Each problem is a MATH-style dict ``{"problem", "solution", "type", "level"}`` whose worked solution ends in
``\boxed{answer}``, so the project's MATH loader (``math_record``) turns it into a prompt record and math-verify
grades it like any MATH problem. Everything is fixed by the seed; nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "stickers")


def _add(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {
        "problem": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "solution": f"{name} has $ {a} + {b} = {a + b} $ {item}. The answer is $\\boxed{{{a + b}}}$.",
        "type": "Addition",
    }


def _subtract(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    b, c = rng.randint(1, 9), rng.randint(1, 9)
    a = b + c
    return {
        "problem": f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
        "solution": f"{name} has $ {a} - {b} = {c} $ {item} left. The answer is $\\boxed{{{c}}}$.",
        "type": "Subtraction",
    }


def _multiply(rng: random.Random) -> dict:
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return {
        "problem": f"A box holds {a} {item}. How many {item} are in {b} boxes?",
        "solution": f"There are $ {a} \\times {b} = {a * b} $ {item}. The answer is $\\boxed{{{a * b}}}$.",
        "type": "Multiplication",
    }


VARIABLES = "abcdkmnpqrstuwxy"


def _linear(rng: random.Random) -> dict:
    # x + b = c: its solution c - b = x is a fact of the subtraction problems (both operands 1-9).
    x, b, v = rng.randint(1, 9), rng.randint(1, 9), rng.choice(VARIABLES)
    c = x + b
    move = f"Move {b} to the other side: $ {v} = {c}"
    return {
        "problem": f"Solve for ${v}$: $ {v} + {b} = {c} $.",
        "solution": f"{move} - {b} = {x} $. The answer is $\\boxed{{{x}}}$.",
        # A careless teacher's version: the sign error of moving a term without negating it (see make_problems).
        "flawed_solution": f"{move} + {b} = {c + b} $. The answer is $\\boxed{{{c + b}}}$.",
        "type": "Algebra",
    }


def _fraction(rng: random.Random) -> dict:
    d = rng.randint(3, 9)
    a, b = rng.randint(1, d - 1), rng.randint(1, d - 1)
    total = a + b
    answer = f"\\frac{{{total}}}{{{d}}}"
    return {
        "problem": f"What is $ \\frac{{{a}}}{{{d}}} + \\frac{{{b}}}{{{d}}} $? Do not simplify.",
        "solution": f"Add the numerators: $ \\frac{{{a} + {b}}}{{{d}}} = {answer} $. "
        f"The answer is $\\boxed{{{answer}}}$.",
        "type": "Fractions",
    }


GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "addition": _add,
    "subtraction": _subtract,
    "multiplication": _multiply,
    "algebra": _linear,
    "fractions": _fraction,
}


def make_problems(count: int, seed: int, kinds: tuple[str, ...] = tuple(GENERATORS)) -> list[dict]:
    """``count`` MATH-format problems drawn round-robin from ``kinds`` (names of ``GENERATORS``), fixed by ``seed``.

    Problems may repeat; ``data.dedupe`` removes repeats before the train/test split. Algebra problems also carry
    a ``flawed_solution``: what a careless teacher writes (a sign error), for SFT data that are not all
    correct, as demonstrations in practice are not.
    """
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown problem kinds {unknown or list(kinds)}; choose from {', '.join(GENERATORS)}")
    rng = random.Random(seed)
    problems = []
    for i in range(count):
        problem = GENERATORS[kinds[i % len(kinds)]](rng)
        problem["level"] = "Level 1"
        problems.append(problem)
    return problems
