"""Cost of phrase alerts on the event loop: microseconds per `AlertRules.match` of a final-sized
text and of a text at the MAX_TEXT_CHARS cut, with the shipped example rules and with 1000
phrases. Run: python -m benchmarks.alerts"""

from __future__ import annotations

import functools
import random
import timeit
from pathlib import Path

from streamsrv import alerts

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "alert-phrases.example"
FINAL = "Password incorrect. Please enter your password followed by the pound key, he hits me."


def main() -> None:
    rng = random.Random(1)
    vocabulary = [f"w{i}" for i in range(3000)]
    phrases = dict.fromkeys(
        "en: " + " ".join(rng.sample(vocabulary, rng.randint(1, 3))) for _ in range(1000)
    )
    many = alerts.parse("\n".join(phrases) + "\nen: re: \\bhe (hits|beats) me\\b\n")
    long = " ".join(rng.choice(vocabulary) for _ in range(800))[: alerts.MAX_TEXT_CHARS]
    for name, rules in (
        (f"example ({len(alerts.load(EXAMPLE).rules)} rules)", alerts.load(EXAMPLE)),
        (f"{len(many.rules) - 1} phrases + 1 regex", many),
    ):
        for label, text in ((f"{len(FINAL)} chars", FINAL), (f"{len(long)} chars", long)):
            number = 2000 if len(text) < 200 else 200
            run = functools.partial(rules.match, "en", text)
            best = min(timeit.repeat(run, number=number, repeat=5))
            print(f"{name:26s} {label:11s} {best / number * 1e6:8.1f} us per match")


if __name__ == "__main__":
    main()
