"""The parts of ``benchmarks/gpu_suite.py``: one module per part, plus the time budget
(:mod:`.budget`) and the report writers (:mod:`.report`).

Every part is a function ``run(ctx)`` taking a :class:`.budget.PartContext`: it records its
figures in ``ctx.figures``, its table in ``ctx.lines`` (Markdown), correctness failures with
``ctx.fail(...)``, and calls ``ctx.check()`` between items so that it stops cleanly when its
time is up.
"""
