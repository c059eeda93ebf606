"""The command line makes an image from a prompt."""

from PIL import Image

from impasto.cli import main


def test_generate_writes_png(tiny_dir, tmp_path, capsys):
    out = tmp_path / "star.png"
    rc = main(["generate", "a red star on a blue background", "-o", str(out), "--model", tiny_dir,
               "--steps", "3", "--seed", "1", "-q"])
    assert rc == 0
    assert Image.open(out).size == (32, 32)
    assert "wrote" in capsys.readouterr().out


def test_grid_contact_sheet(tiny_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "a star", "-o", str(out), "--model", tiny_dir, "--steps", "2", "--grid", "4", "-q"]) == 0
    assert Image.open(out).size == (64, 64)


def test_error_is_one_line(tiny_dir, tmp_path, capsys):
    rc = main(["generate", "a star", "-o", str(tmp_path / "x.png"), "--model", tiny_dir, "--adapter", "missing", "-q"])
    assert rc == 2
    assert "AdapterNameError" in capsys.readouterr().err
