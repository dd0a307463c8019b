r"""Generated arithmetic and algebra word problems in MATH format, for the main job on one CPU machine.

Each problem is a MATH-style dict ``{"problem", "solution", "type", "level"}`` whose worked solution ends in
``\boxed{answer}``, so the project's MATH loader (``math_record``) turns it into a prompt record and math-verify
grades it like any MATH problem. It also lists ``distractors``: plausible wrong answers (the wrong operation, an
off-by-one count, a forgotten step), from which ``multiple_choice`` asks the same problem as a four-option
question in MMLU format (``mmlu_record`` turns it into a prompt record graded by ``score_mcq``). Everything is
fixed by the seed; nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nemo_logitavg.data.prompts import CHOICE_LETTERS
from nemo_logitavg.rewards import extract_last_boxed

NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "stickers")


def _numbers(answer: int, wrong: list[int]) -> list[str]:
    """The distinct non-negative values of ``wrong`` other than ``answer``, in order, as strings."""
    return [str(v) for v in dict.fromkeys(wrong) if v >= 0 and v != answer]


def _add(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {
        "problem": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "solution": f"{name} has $ {a} + {b} = {a + b} $ {item}. The answer is $\\boxed{{{a + b}}}$.",
        "distractors": _numbers(a + b, [a + b - 1, a + b + 1, a * b, a + b + 2, abs(a - b)]),
        "type": "Addition",
    }


def _subtract(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    b, c = rng.randint(1, 9), rng.randint(1, 9)
    a = b + c
    return {
        "problem": f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
        "solution": f"{name} has $ {a} - {b} = {c} $ {item} left. The answer is $\\boxed{{{c}}}$.",
        "distractors": _numbers(c, [a + b, c + 1, c - 1, b, c + 2]),
        "type": "Subtraction",
    }


def _multiply(rng: random.Random) -> dict:
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return {
        "problem": f"A box holds {a} {item}. How many {item} are in {b} boxes?",
        "solution": f"There are $ {a} \\times {b} = {a * b} $ {item}. The answer is $\\boxed{{{a * b}}}$.",
        "distractors": _numbers(a * b, [a * (b + 1), a * (b - 1), a + b, a * b + 1]),
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
        "distractors": _numbers(x, [c + b, c, x + 1, x - 1, b]),
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
        # Adding the denominators too, an off-by-one numerator, multiplying the numerators.
        "distractors": [f"\\frac{{{n}}}{{{m}}}" for n, m in dict.fromkeys(
            [(total, 2 * d), (total + 1, d), (total - 1, d), (a * b, d)]) if (n, m) != (total, d)],
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


def _choice_text(answer: str) -> str:
    r"""An option as the problems write numbers: an integer bare, LaTeX (``\frac{5}{7}``) in ``$ ... $``."""
    return answer if answer.isdigit() else f"$ {answer} $"


def multiple_choice(problem: dict, rng: random.Random) -> dict:
    r"""``problem`` (from ``make_problems``) asked as a four-option question, in MMLU format: ``question``,
    ``choices`` (4 strings), ``answer`` (the index of the right one), ``subject`` and ``type`` (the problem type).

    The three wrong options are drawn from the problem's ``distractors``; the careless teacher's answer (of a
    ``flawed_solution``) is always one of them, so a flawed demonstration can pick it. The four options are
    shuffled with ``rng``: the right letter is uniform over A-D. ``solution`` (and ``flawed_solution``) are the
    problem's worked steps, then the options checked in order against the value they reach until it is found, then
    its letter in the form ``score_mcq`` reads and the MCQ prompt asks for:
    ``... = 14 $ stamps. Check the options: A 16 = 14 no, B 14 = 14 yes. The answer is $\boxed{B}$.`` Each
    check writes the option beside the value, so that the comparison is local: the main job's model did not learn
    to find a value's letter in the option list from afar (with the bare letter, or with "A 16 no", it stayed
    near chance; BENCHMARKS.md).
    """
    answer = extract_last_boxed(problem["solution"])
    teacher = extract_last_boxed(problem["flawed_solution"]) if "flawed_solution" in problem else None
    wrong = [teacher] if teacher else []
    pool = [d for d in problem["distractors"] if d != answer and d not in wrong]
    rng.shuffle(pool)
    wrong += pool[: 3 - len(wrong)]
    if len(wrong) != 3 or answer in wrong:
        raise ValueError(f"problem {problem['problem']!r}: fewer than 3 distractors other than {answer!r}")
    options = [answer, *wrong]
    rng.shuffle(options)
    out = {
        "question": problem["problem"],
        "choices": [_choice_text(o) for o in options],
        "answer": options.index(answer),
        "subject": problem["type"],
        "type": problem["type"],
    }
    for key in ("solution", "flawed_solution"):
        if key in problem:
            value = extract_last_boxed(problem[key])
            work = problem[key][: problem[key].rindex("The answer is")]
            found = options.index(value)
            checks = ", ".join(f"{CHOICE_LETTERS[i]} {out['choices'][i]} = {_choice_text(value)} "
                               f"{'yes' if i == found else 'no'}" for i in range(found + 1))  # fmt: skip
            out[key] = f"{work}Check the options: {checks}. The answer is $\\boxed{{{CHOICE_LETTERS[found]}}}$."
    return out
