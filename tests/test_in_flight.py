"""An inference actor's record of the images in hand survives its process and names the
image that kills it (pipeline/in_flight.py)."""

from __future__ import annotations

from rayseg.pipeline.in_flight import MAX_DEATHS_ALONE, Deaths, InFlightRecord


def died_holding(path: str, image_ids: list[str]) -> InFlightRecord:
    """The record a restarted process loads after its predecessor died holding `image_ids`."""
    InFlightRecord.load(path).hold(image_ids)
    return InFlightRecord.load(path)


def test_a_process_that_finishes_its_images_leaves_no_record(tmp_path):
    path = str(tmp_path / "actor.json")
    record = InFlightRecord.load(path)
    record.hold(["a", "b"])
    assert (tmp_path / "actor.json").exists()
    record.release(["a", "b"])
    assert not (tmp_path / "actor.json").exists()
    assert not InFlightRecord.load(path).suspects(["a", "b"])


def test_images_in_hand_when_a_process_dies_are_suspects_of_the_next(tmp_path):
    record = died_holding(str(tmp_path / "actor.json"), ["a", "b"])
    assert record.suspects(["x", "b"]) and not record.suspects(["x", "y"])
    assert record.deaths == {"a": Deaths(with_others=1), "b": Deaths(with_others=1)}
    assert record.given_up("a") is None


def test_an_image_is_given_up_on_once_it_died_alone_often_enough(tmp_path):
    path = str(tmp_path / "actor.json")
    died_holding(path, ["a", "b"])
    for deaths_alone in range(1, MAX_DEATHS_ALONE + 1):
        record = died_holding(path, ["a"])
        assert record.deaths["a"] == Deaths(with_others=1, alone=deaths_alone)
        assert (record.given_up("a") is not None) == (deaths_alone == MAX_DEATHS_ALONE)
    assert record.deaths["b"] == Deaths(with_others=1), "b was not in hand when a died alone"


def test_a_finished_image_is_forgotten_and_the_others_remembered(tmp_path):
    path = str(tmp_path / "actor.json")
    record = died_holding(path, ["a", "b"])
    record.hold(["a"])
    record.release(["a"])
    assert set(InFlightRecord.load(path).deaths) == {"b"}


def test_an_unreadable_record_starts_afresh(tmp_path):
    (tmp_path / "actor.json").write_text('{"in_hand": ["a"')  # torn
    record = InFlightRecord.load(str(tmp_path / "actor.json"))
    assert record.deaths == {}
