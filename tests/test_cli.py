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
    assert Image.open(out).size == (256, 256)  # 2x2 sheet of 32 px images, enlarged 4x


def test_error_is_one_line(tiny_dir, tmp_path, capsys):
    rc = main(["generate", "a star", "-o", str(tmp_path / "x.png"), "--model", tiny_dir, "--adapter", "missing", "-q"])
    assert rc == 2
    assert "AdapterNameError" in capsys.readouterr().err


def test_covariance_command(tiny_dir, tmp_path, capsys):
    import os

    captions = tmp_path / "captions.txt"
    words = "red green blue yellow star circle square heart photo of a on the small large".split()
    captions.write_text("\n".join(" ".join(words[(i * 3 + j) % len(words)] for j in range(2 + i % 7))
                                  for i in range(200)))
    before = sorted(os.listdir(tiny_dir))
    assert main(["covariance", "--model", tiny_dir, "--captions", str(captions), "--adapter-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (written,) = list((tmp_path / "covariance").glob("*.safetensors"))
    assert str(written) in out
    assert sorted(os.listdir(tiny_dir)) == before  # never written into the model folder
