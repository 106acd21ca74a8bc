"""`m4v flops`: sizes generation could not use are one-line errors (exit 2), as in `m4v generate`."""

import json

import pytest

from m4v.cli import main


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "0"], "--frames: 0 is not 1 + 8k; the nearest valid value is 1"),
        (["--frames", "121", "20"], "--frames: 20 is not 1 + 8k; the nearest valid value is 17"),
        (["--height", "100"], "--height: 100 is not allowed; it must be a multiple of 64"),  # VAE 8 x patch 2 x 2^2
        (["--width", "0"], "--width: 0 is not allowed"),
        (["--text-len", "-1"], "--text-len: must be >= 0"),
        (["--config", "nope"], "unknown named config 'nope'"),
    ],
)
def test_bad_sizes_one_line_exit_2(capsys, args, message):
    assert main(["flops", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert message in err[0], err[0]
    assert captured.out == ""


def test_valid_small_sizes_print_the_table(capsys):
    assert main(["flops", "--frames", "17", "--height", "128", "--width", "192", "--layouts", "full_attn"]) == 0
    assert "full_attn" in capsys.readouterr().out


def test_a_repeated_layout_is_one_row(capsys):
    assert main(["flops", "--json", "--frames", "17", "--layouts", "full_attn", "full_temp", "full_attn"]) == 0
    rows = json.loads(capsys.readouterr().out)
    layouts = [r["layout"] for r in (rows["rows"] if isinstance(rows, dict) else rows)]
    assert sorted(layouts) == ["full_attn", "full_temp"]
