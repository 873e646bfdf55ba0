"""The engine room of one training step: the per-step kernels and the plan that drives them.

:class:`sparseham.MaskManager` decides *what* a step does (the six stages of the pipeline) and
:class:`sparseham.HAM` wraps the optimizer; both call in here for *how*:

- :mod:`.plan`: what the manager hands the optimizer for one step (:class:`~.plan.StepPlan`), and
  what HAM hands the executor per param group (:class:`~.plan.GroupPlan`), with named fields;
- :mod:`.masking`: the masking stages (gradients, weights, optimizer state by shape);
- :mod:`.mirror`: the mirror step's kernels (for-loop, foreach, compiled) and the norm cap;
- :mod:`.signflip`: the sign-flip kernels, the eager int8 and the compiled float formulation;
- :mod:`.one_pass`: the one-pass executor, every stage of a step in one compiled pass per tensor;
- :mod:`.compile`: :func:`~.compile.compile_kernel`, the one way a kernel here is compiled (its own
  Dynamo cache, and the eager fallback when compiling fails).

Nothing in here reads a device value on the host, except the norm cap on CPU where that costs no
synchronisation (:data:`.mirror.HOST_READS_FREE`).
"""
