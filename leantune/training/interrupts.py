"""Ctrl-C during training: the first press saves a checkpoint after the current step, the second stops.

The first Ctrl-C ends the run after the current step with a checkpoint; the second stops at
once, except while a checkpoint is being written: that one is finished first, so a double
Ctrl-C leaves the latest checkpoint complete and never a half-written one. Later presses
are ignored: the run is already on its way out. The loop's Trainer takes these methods.
"""
from __future__ import annotations

import sys
from typing import Any

from . import checkpoint as ckpt
from .rundir import resume_command
from .runtime import say_from_signal_handler


class CtrlCStops:
    """What the Trainer does on Ctrl-C (it provides env, out_dir, command, save and _interrupted_result)."""

    interrupts = 0  # Ctrl-C presses during training
    writing_checkpoint = False  # a checkpoint is being written: a second Ctrl-C waits for it
    stopping = False  # the run is saving its way out after the first Ctrl-C

    def _install_sigint(self) -> Any:
        return self.env.install_sigint(self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            say_from_signal_handler("\nCtrl-C: saving a checkpoint after this step (press again to stop at once)\n")
        elif self.interrupts == 2 and (self.writing_checkpoint or self.stopping):
            say_from_signal_handler("\nCtrl-C again: stopping as soon as the checkpoint being written is complete\n")
        elif self.interrupts == 2:
            raise KeyboardInterrupt

    def _save_and_stop(self, state: dict[str, Any]) -> Any:
        """After the first Ctrl-C: the checkpoint of this step (unless the loop just wrote it), then the resume hint."""
        self.stopping = True
        latest = ckpt.latest_checkpoint(self.out_dir)
        path = latest if latest is not None and latest.name == ckpt.step_dir_name(state["step"]) else self.save(state)
        print(f"\ninterrupted at step {state['step']}; checkpoint saved to {path}.\n"
              f"resume with: {resume_command(self.out_dir, self.command)}", file=sys.stderr, flush=True)
        return self._interrupted_result(state)

    def _stopped_at_once(self, state: dict[str, Any]) -> Any:
        """After the second Ctrl-C: one line on what is on disk; the steps since the last checkpoint are lost."""
        latest = ckpt.latest_checkpoint(self.out_dir)
        kept = (f"the last checkpoint is {latest}; resume with: {resume_command(self.out_dir, self.command)}"
                if latest is not None else "no checkpoint was saved")
        print(f"\nstopped at once after step {state['step']}; {kept}", file=sys.stderr, flush=True)
        return self._interrupted_result(state)

    def _restore_sigint(self, previous: Any) -> None:
        self.env.restore_sigint(previous)
