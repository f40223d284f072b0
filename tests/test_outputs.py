"""Output names inside --output_dir, and moving another run's file aside."""

from sam_eos.reports import paths


def test_standard_names_inside_the_output_directory():
    assert paths.output_paths("runs/a") == {
        "raw_data": "runs/a/raw.txt",
        "eigs_curve": "runs/a/eigs.pdf",
        "eigs_se_only": "runs/a/eigs_se_only.pdf",
        "alignment_curve": "runs/a/alignment.pdf",
        "loss_curve": "runs/a/loss.pdf",
    }
    assert paths.output_paths("d", prefix="gd_")["eigs_curve"] == "d/gd_eigs.pdf"


def test_move_aside_takes_the_first_free_number_and_keeps_the_extension(tmp_path):
    raw = tmp_path / "raw.txt"
    assert paths.move_aside(str(raw)) is None  # nothing to keep
    raw.write_text("first run")
    assert paths.move_aside(str(raw)) == str(tmp_path / "raw.1.txt")
    assert not raw.exists() and (tmp_path / "raw.1.txt").read_text() == "first run"
    (tmp_path / "raw.3.txt").write_text("someone's")
    raw.write_text("second run")
    assert paths.move_aside(str(raw)) == str(tmp_path / "raw.2.txt")
    raw.write_text("third run")
    assert paths.move_aside(str(raw)) == str(tmp_path / "raw.4.txt")
    assert (tmp_path / "raw.3.txt").read_text() == "someone's"
    bare = tmp_path / "raw"
    bare.write_text("x")
    assert paths.move_aside(str(bare)) == str(tmp_path / "raw.1")


def test_only_a_resumed_run_appends_to_its_own_file():
    assert paths.raw_data_action(exists=False, resuming=True, same_run=False) == "create"
    assert paths.raw_data_action(exists=True, resuming=True, same_run=True) == "append"
    assert paths.raw_data_action(exists=True, resuming=False, same_run=True) == "move_aside"
    assert paths.raw_data_action(exists=True, resuming=True, same_run=False) == "move_aside"
