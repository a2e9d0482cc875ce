"""How work runs fast, and safely: nothing outside this package knows how.

- ``drivers``: the rules for ``vmap`` against the task loop, and the loop itself, on one thread or
  on the CPU's task threads (``run_tasks``), with a module copy per worker.
- ``task_gradients``: meta-gradients one task at a time, each task on leaves of its own, summed in
  task order and returned through a surrogate loss (MAML's task loop, and so FOMAML, Meta-SGD
  and ANIL; the metric learners ProtoNet, MatchingNet and RelationNet).
- ``executed``: the rewritten copy of a network the loops run (ReLU after max-pool, fused kernels).
- ``layout``: channels-last where a pass is differentiated at most once.
- ``plain_norm``: batch-norm in plain ops, exact under ``vmap``.
- ``kernels``: the fused CPU kernels (C, built on first use, called through ctypes).

The thread rule (docs/RELIABILITY.md): no two threads ever build autograd graphs on the same leaf
tensor. Measurements are in docs/PERFORMANCE.md, not here.
"""
