"""A built-in instruction source: prompt/completion records made from templates, no download.

Real instruction mixtures (GPT-JT used chain-of-thought data, P3 and Natural Instructions)
are large downloads. These small stand-ins let the demo and the tests exercise the
instruction path: multi-digit arithmetic with step-by-step answers (chain of thought),
classification (parity, sentiment of template reviews), unit conversions, number
comparison, sorting and spelling. Record ``i`` of ``seed`` is a pure function of
``(seed, i)``: the same on every machine, every run, in any order.

Prompts end with an answer cue ("Answer:" or "A:"); completions start with a space, so
``prompt + completion`` reads as one text.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")

POSITIVE = ("wonderful", "excellent", "delightful", "fantastic", "charming", "superb", "pleasant", "great")
NEGATIVE = ("terrible", "disappointing", "awful", "boring", "dreadful", "mediocre", "unpleasant", "poor")
SUBJECTS = (
    "The movie", "This restaurant", "The hotel room", "Our new phone", "The concert", "This book",
    "The service", "The coffee", "The museum tour", "This laptop", "The train ride", "The new album",
)
POSITIVE_TAILS = ("I would happily recommend it.", "I will come back for more.", "It made my day.", "Worth every penny.")
NEGATIVE_TAILS = ("I want my money back.", "I would not recommend it.", "It ruined my evening.", "Never again.")

WORDS = (
    "apple", "river", "garden", "window", "planet", "candle", "forest", "yellow", "bridge", "pencil",
    "orange", "silver", "monkey", "rocket", "turtle", "violin", "harbor", "island", "meadow", "puzzle",
    "lantern", "feather", "compass", "blanket", "thunder", "kitchen", "mirror", "anchor", "cactus", "zebra",
)

# (singular, plural, smaller singular, smaller plural, factor)
UNITS = (
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("liter", "liters", "milliliter", "milliliters", 1000),
    ("day", "days", "hour", "hours", 24),
    ("foot", "feet", "inch", "inches", 12),
    ("yard", "yards", "foot", "feet", 3),
)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _number(rng: np.random.Generator, min_digits: int, max_digits: int) -> int:
    digits = int(rng.integers(min_digits, max_digits + 1))
    return int(rng.integers(10 ** (digits - 1), 10**digits))


def _ask(rng: np.random.Generator, question: str) -> str:
    return _pick(rng, (f"{question}\nAnswer:", f"Q: {question}\nA:", f"Question: {question}\nAnswer:"))


def addition(rng: np.random.Generator) -> tuple[str, str]:
    """Column addition, one place value per step with its carry."""
    a, b = _number(rng, 2, 6), _number(rng, 2, 6)
    question = _pick(rng, (
        f"What is {a} + {b}? Think step by step.",
        f"Add {a} and {b}. Show your work.",
        f"Compute the sum of {a} and {b}, digit by digit.",
    ))
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        expression = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = total // 10
        carried = f", carry {carry}." if carry else "."
        steps.append(f"{PLACES[i].capitalize()}: {expression} = {total}, write {total % 10}{carried}")
    if carry:
        steps.append(f"The final carry {carry} becomes the leading digit.")
    return _ask(rng, question), " " + " ".join(steps) + f" So {a} + {b} = {a + b}."


def multiplication(rng: np.random.Generator) -> tuple[str, str]:
    """Long multiplication by partial products."""
    a = _number(rng, 2, 4)
    b = _number(rng, 1, 2)
    question = _pick(rng, (f"What is {a} × {b}? Explain step by step.", f"Multiply {a} by {b}. Show your work."))
    if b < 10:
        parts = [(int(d) * 10 ** i) for i, d in enumerate(str(a)[::-1]) if d != "0"][::-1]
        products = [p * b for p in parts]
        work = (
            f"Split {a} into {' + '.join(map(str, parts))}. "
            + " ".join(f"{p} × {b} = {q}." for p, q in zip(parts, products))
            + (f" Adding: {' + '.join(map(str, products))} = {a * b}." if len(products) > 1 else "")
        )
    else:
        ones, tens = b % 10, b - b % 10
        products = [(a * ones, ones), (a * tens, tens)] if ones else [(a * tens, tens)]
        work = " ".join(f"{a} × {m} = {p}." for p, m in products)
        if len(products) > 1:
            work += f" Adding: {products[0][0]} + {products[1][0]} = {a * b}."
    return _ask(rng, question), f" {work} So {a} × {b} = {a * b}."


def parity(rng: np.random.Generator) -> tuple[str, str]:
    """Even or odd, with or without the one-line reason."""
    n = _number(rng, 1, 6)
    label = "even" if n % 2 == 0 else "odd"
    if rng.random() < 0.5:
        return _ask(rng, f"Is {n} even or odd?"), f" The last digit of {n} is {n % 10}, which is {label}, so {n} is {label}."
    return f"Classify the number as even or odd.\nNumber: {n}\nLabel:", f" {label}"


def sentiment(rng: np.random.Generator) -> tuple[str, str]:
    """Positive or negative review made from templates."""
    positive = bool(rng.random() < 0.5)
    adjective = _pick(rng, POSITIVE if positive else NEGATIVE)
    tail = _pick(rng, POSITIVE_TAILS if positive else NEGATIVE_TAILS)
    review = f"{_pick(rng, SUBJECTS)} was {adjective}. {tail}"
    label = "positive" if positive else "negative"
    prompt = _pick(rng, (
        f"Review: {review}\nIs this review positive or negative?\nAnswer:",
        f"Classify the sentiment of the sentence as positive or negative.\nSentence: {review}\nSentiment:",
    ))
    return prompt, f" {label}"


def unit_conversion(rng: np.random.Generator) -> tuple[str, str]:
    """Multiply or divide by a conversion factor, or Celsius to Fahrenheit, with the reasoning."""
    if rng.random() < 0.15:
        celsius = 5 * int(rng.integers(-8, 21))
        scaled = celsius * 9 // 5
        fahrenheit = scaled + 32
        question = f"Convert {celsius} degrees Celsius to degrees Fahrenheit."
        answer = f" Multiply by 9/5: {celsius} × 9/5 = {scaled}. Add 32: {scaled} + 32 = {fahrenheit}."
        return _ask(rng, question), answer + f" So {celsius} °C is {fahrenheit} °F."
    big, bigs, small, smalls, factor = UNITS[int(rng.integers(len(UNITS)))]
    k = int(rng.integers(2, 100))
    if rng.random() < 0.5:
        question = f"How many {smalls} are in {k} {bigs}?"
        answer = f" 1 {big} is {factor} {smalls}, so {k} {bigs} is {k} × {factor} = {k * factor} {smalls}."
    else:
        question = f"Convert {k * factor} {smalls} to {bigs}."
        answer = f" {factor} {smalls} make 1 {big}, so {k * factor} {smalls} is {k * factor} ÷ {factor} = {k} {bigs}."
    return _ask(rng, question), answer


def comparison(rng: np.random.Generator) -> tuple[str, str]:
    """Which of two (often similar) numbers is larger, and why."""
    x = _number(rng, 2, 6)
    y = x
    if rng.random() < 0.6:  # the same digits in another order: the hard case
        for _ in range(8):
            digits = list(str(x))
            rng.shuffle(digits)
            if digits[0] != "0":
                y = int("".join(digits))
                if y != x:
                    break
    if y == x:
        y = _number(rng, 2, 6)
        y = y + 1 if y == x else y
    larger, smaller = max(x, y), min(x, y)
    if len(str(larger)) != len(str(smaller)):
        reason = f"{larger} has {len(str(larger))} digits and {smaller} has {len(str(smaller))}"
    else:
        i = next(i for i, (p, q) in enumerate(zip(str(larger), str(smaller))) if p != q)
        place = PLACES[len(str(larger)) - 1 - i]
        reason = f"They first differ in the {place} digit, where {str(larger)[i]} > {str(smaller)[i]}"
    return _ask(rng, f"Which number is larger, {x} or {y}?"), f" {reason}, so {larger} is larger."


def sorting(rng: np.random.Generator) -> tuple[str, str]:
    """Alphabetical order of a few words."""
    count = int(rng.integers(3, 7))
    words = [WORDS[i] for i in rng.choice(len(WORDS), size=count, replace=False)]
    return _ask(rng, f"Sort these words alphabetically: {', '.join(words)}."), " " + ", ".join(sorted(words))


def spelling(rng: np.random.Generator) -> tuple[str, str]:
    """Spell a word letter by letter and count its letters."""
    word = _pick(rng, WORDS)
    question = f"Spell the word \"{word}\" letter by letter and count its letters."
    return _ask(rng, question), f" {'-'.join(word)}: {len(word)} letters."


GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "addition": addition,
    "multiplication": multiplication,
    "parity": parity,
    "sentiment": sentiment,
    "unit_conversion": unit_conversion,
    "comparison": comparison,
    "sorting": sorting,
    "spelling": spelling,
}
TASKS = tuple(GENERATORS)


def instruction_record(index: int, seed: int = 0) -> dict[str, str]:
    """Record ``index`` of the infinite built-in stream: ``{"prompt", "completion", "task"}``."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    task = TASKS[int(rng.integers(len(TASKS)))]
    prompt, completion = GENERATORS[task](rng)
    return {"prompt": prompt, "completion": completion, "task": task}


def builtin_instruction_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The first ``n`` records of the built-in stream for ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [instruction_record(i, seed) for i in range(n)]
