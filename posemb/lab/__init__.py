"""Layer 5, the lab: data, training (one process or ``torchrun`` DDP), evaluation by length,
passkey retrieval, and the study that rebuilds the seed's comparison table from measurements.

Entry points: ``posemb study`` (:mod:`posemb.lab.study`) and ``python -m posemb.lab.train``.
"""
