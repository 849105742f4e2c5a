"""The parts of the training driver (``lumina.loop.train`` strings them together).

prepare.py        ``Run`` (the driver's context) and ``prepare_run``: config, device, data,
                  state (fresh or resumed), run folder; ``find_resume``, ``resolve_device``
stepping.py       one optimizer step: batch, injected faults, the compiled step, its record
evaluation.py     held-out evaluation, best-so-far, early stopping (cadence: ``eval_every``)
orchestration.py  observations, decisions, acting on them; out-of-memory response
rollback.py       the snapshot ring, where a rollback restores from, the data-position rule
checkpointing.py  when to save (``ckpt_every``, best, final) and what bookkeeping rides along
registry.py       start-value suggestions from similar past runs; this run's registry record
console.py        terminal lines and progress, metrics.jsonl + TensorBoard
"""
