"""capray.checkpoint: which directories of a training run count as checkpoints."""
from __future__ import annotations

import torch

from capray.checkpoint import is_complete, resolve_checkpoint, write_checkpoint
from capray.formats import TRAIN_STATE_FILE, VOCAB_FILE
from capray.training import existing_checkpoints
from capray.vocab import SPECIALS, Vocabulary


def _checkpoint(directory, *, epoch: int, val_bleu4: float) -> None:
    write_checkpoint(str(directory), state={"decoder.w": torch.zeros(2)}, config={}, vocab=Vocabulary(list(SPECIALS)),
                     train_state={"epoch": epoch, "val_bleu4": val_bleu4})


def test_a_partly_uploaded_checkpoint_is_neither_listed_nor_chosen(tmp_path):
    """A Train worker killed mid-upload leaves part of a checkpoint: here the best-scoring one."""
    run = tmp_path / "run"
    _checkpoint(run / "checkpoint_2026-01-01_00-00-01.000000", epoch=0, val_bleu4=0.1)
    _checkpoint(run / "checkpoint_2026-01-01_00-00-02.000000", epoch=1, val_bleu4=0.2)
    partial = run / "checkpoint_2026-01-01_00-00-03.000000"
    _checkpoint(partial, epoch=2, val_bleu4=0.9)
    (partial / VOCAB_FILE).unlink()
    no_state = run / "checkpoint_2026-01-01_00-00-04.000000"
    _checkpoint(no_state, epoch=3, val_bleu4=0.9)
    (no_state / TRAIN_STATE_FILE).unlink()

    assert not is_complete(str(partial)) and not is_complete(str(no_state))
    assert sorted(existing_checkpoints(str(run))) == [str(run / "checkpoint_2026-01-01_00-00-01.000000"),
                                                      str(run / "checkpoint_2026-01-01_00-00-02.000000")]
    assert resolve_checkpoint(str(run)) == str(run / "checkpoint_2026-01-01_00-00-02.000000")
