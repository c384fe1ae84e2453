"""``python -m raydistill.bench``: throughput of the production training step, per method.

Each method is set up exactly as ``train`` sets it up and its step is the production one, both
through ``raydistill.steprunner.StepRunner`` (the bench touches no engine internals); see
``throughput`` for what a method's ``results`` entry holds.

Other modes: ``--compare-authors-peeraid`` races the authors'-code PeerAiD step (reference code of
the checkout, ``benchmarks/reference/peeraid_authors.py``: fp32, three student forwards, parameters
requiring gradients in the attack) against ours in strict fp32 and on the fast path, in alternating
rounds, and prints the median speed-ups; ``--ablation`` races the first method's step with each
speed feature alone; ``--ray-overhead`` compares the steady-state epoch time of a 1-worker
TorchTrainer run with the in-process loop (with ``--beside-idle-ray`` also the in-process loop
beside an idle Ray instance: how much of it is CPU contention with Ray's processes, and the share of
the machine's CPUs those processes took meanwhile); ``--pgd20-check CHECKPOINT`` compares a fixed
model's PGD-20 accuracy in fp32 and on the fast path.

Modules: ``cli`` (options, printing, main), ``configs`` (one invocation's configs and runners),
``measure`` (pass counting, peak memory, timed steps, the machine), ``throughput`` (a method's
results entry), ``races`` (alternating races: the authors' comparison, the ablation), ``overhead``
(Ray's overhead, the idle Ray instance, /proc process-tree CPU time), ``checks`` (PGD-20 check).
"""
