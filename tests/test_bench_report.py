"""Where `python -m benchmarks.report --out` writes its table."""
import pathlib

from benchmarks.report import output_place


def test_out_naming_a_markdown_file_is_that_file(tmp_path):
    assert output_place(tmp_path / "amd.md", ["small"], "2026-12-02") == (tmp_path, "amd")


def test_out_naming_a_folder_gets_a_machine_and_date_stem(tmp_path):
    folder, stem = output_place(tmp_path, ["small", "smollm2"], "2026-12-02")
    assert folder == tmp_path and stem.endswith("-2026-12-02")
    assert output_place(tmp_path, ["qwen3"], "2026-12-02")[1].endswith("-2026-12-02-qwen3")
    assert isinstance(folder, pathlib.Path)
