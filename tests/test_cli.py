import subprocess
import sys

from glassgpt.cli import main


def test_info_prints_the_breakdown_and_sizes(capsys):
    assert main(["info", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out
    assert "38,597,376" in out  # token embedding 50257 x 768
    assert "474.7 MiB" in out and "237.4 MiB" in out


def test_info_per_block_for_tinygpt(capsys):
    assert main(["info", "tinygpt", "--per-block"]) == 0
    out = capsys.readouterr().out
    assert "2,453" in out and "block 0 attention" in out and "1,088" in out


def test_tokenize_prints_ids(capsys):
    assert main(["tokenize", "The painting was"]) == 0
    out = capsys.readouterr().out
    assert "12036" in out and "' painting'" in out and "3 tokens" in out


def test_tokenize_char(capsys):
    assert main(["tokenize", "hello hello", "--tokenizer", "char"]) == 0
    assert "11 tokens" in capsys.readouterr().out


def test_python_m_glassgpt_is_the_command_with_its_error_policy():
    """What torchrun starts (`torchrun -m glassgpt train ...`): the same verbs, the same refusals."""
    result = subprocess.run([sys.executable, "-m", "glassgpt", "train", "--recipe", "tinygpt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "glassgpt: error: say where the run goes: --out DIR"
