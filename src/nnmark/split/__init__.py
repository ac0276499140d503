"""Privacy-partitioned training across data owners and a server (SecureMark-DL, Section III).

Modules: :mod:`~nnmark.split.partition` (cut a zoo network at a named point), :mod:`~nnmark.split.decoders`
and :mod:`~nnmark.split.defenders` (the owners' attacker-simulating defenders), :mod:`~nnmark.split.baselines`
(NoPeek, activation noise), :mod:`~nnmark.split.protocol` (the training rounds, in one process),
:mod:`~nnmark.split.parties` (the same rounds with every party in its own process, on Ray),
:mod:`~nnmark.split.checkpoint` (resumable state), :mod:`~nnmark.split.attackers` (reconstruction attacks at
the server) and :mod:`~nnmark.split.metrics` (MSE, SSIM, perceptual distance, reprint accuracy).
Nothing here is imported by ``import nnmark``.
"""
