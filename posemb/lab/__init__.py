"""Layer 5, the lab: data, training (one process or ``torchrun`` DDP), evaluation by length,
passkey retrieval, and the study that rebuilds the study notes' comparison table from measurements.

Entry points: ``posemb study`` (arguments in :mod:`posemb.lab.study_command`, the study itself in
:mod:`posemb.lab.study`) and ``python -m posemb.lab.train`` (one scheme). Both can run under
``torchrun``; :mod:`posemb.lab.distributed` holds the process-group helpers.
"""
