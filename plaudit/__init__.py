"""Plaudit: a reward-model and preference service for RLHF.

The ``plaudit`` command (:mod:`plaudit.cli`, with :mod:`plaudit.up` and :mod:`plaudit.demo`) sits
on top and composes the layers below it: :mod:`plaudit.services` (shared plumbing, the ONNX model
runtimes and the reward, feedback and generation services) and :mod:`plaudit.trainer` beside them;
:mod:`plaudit.v1` is the generated gRPC contract. In the repository these live in ``services/``,
``trainer/`` and ``protos/plaudit/v1`` (the links here give tools one tree to read).
"""
