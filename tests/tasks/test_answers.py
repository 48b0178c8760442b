"""Matching a reply against a reference answer (services/tasks/answers.py), on hand-made replies."""

from __future__ import annotations

import pytest

from opd.tasks.answers import MissingAnswer, mentions, words


def row(question: str, answer: str, *accept: str) -> dict:
    return {"prompt": question, "answer": answer, "accept": list(accept)}


def test_normalisation_drops_case_articles_punctuation_and_accents_and_reads_number_words() -> None:
    assert words("The capital of Thailand is Bangkok.") == ["capital", "of", "thailand", "is", "bangkok"]
    assert words("Twelve") == words("12") == ["12"]
    assert words("twenty-four") == words("Twenty four!") == ["24"]
    assert words("One hundred and eight legs") == ["108", "legs"]
    assert words("zero") == ["0"] and words("ten") == ["10"] and words("ninety nine") == ["99"]
    assert words("Brasília") == words("BRASILIA") == ["brasilia"]
    assert words("Hee-haw") == ["hee", "haw"] and words("an apple, a pear") == ["apple", "pear"]


@pytest.mark.parametrize("reply", ["Bangkok", "bangkok.", "The capital of Thailand is Bangkok.", "It's Bangkok!"])
def test_a_reply_that_says_the_answer_anywhere_gives_it(reply: str) -> None:
    assert mentions(row("What is the capital of Thailand?", "Bangkok"), reply)


@pytest.mark.parametrize("reply", ["Bangaklesaraya", "Bangkoks", "Thailand", "", "Phuket"])
def test_a_reply_without_the_answer_does_not(reply: str) -> None:
    assert not mentions(row("What is the capital of Thailand?", "Bangkok"), reply)


def test_numbers_match_as_digits_or_words_and_only_as_whole_numbers() -> None:
    chicken = row("How many legs does a chicken have?", "2")
    for reply in ("2", "Two", "two legs", "A chicken has 2 legs."):
        assert mentions(chicken, reply), reply
    for reply in ("12", "The answer is 12. A chicken has 12 legs.", "twenty", "10"):
        assert not mentions(chicken, reply), reply
    assert mentions(row("What is 12 times 2?", "24"), "Twenty-four")
    assert mentions(row("What is 9 times 12?", "108"), "one hundred and eight")


def test_variants_and_articles() -> None:
    ash = row("What color is ash?", "grey", "gray")
    assert mentions(ash, "Gray") and mentions(ash, "It is grey.") and not mentions(ash, "black")
    fruit = row("Name a fruit.", "apple", "banana", "apples")
    assert mentions(fruit, "A banana") and mentions(fruit, "An apple") and mentions(fruit, "Apples")
    assert mentions(row("What sound does a rooster make?", "cock-a-doodle-doo"), "Cock a doodle doo!")


def test_an_echo_of_the_question_is_not_an_answer() -> None:
    eleven = row("What is 11 times 1?", "11")
    assert not mentions(eleven, "11 times 1 is 12")
    assert mentions(eleven, "11") and mentions(eleven, "The answer is eleven.") and mentions(eleven, "11 times 1 is 11")
    sheep = row("What is the plural of sheep?", "sheep")
    assert not mentions(sheep, "The plural of sheep is sheeps.") and mentions(sheep, "Sheep")
    assert mentions(row("What color is an orange?", "orange"), "An orange is orange in colour.")


def test_a_chat_row_is_asked_its_last_user_message_and_a_row_without_an_answer_is_named() -> None:
    chat = {"messages": [{"role": "user", "content": "What is 11 times 1?"}], "answer": "11"}
    assert not mentions(chat, "11 times 1 is 12") and mentions(chat, "11")
    with pytest.raises(MissingAnswer, match="What is 2 plus 2"):
        mentions({"prompt": "What is 2 plus 2?"}, "4")
