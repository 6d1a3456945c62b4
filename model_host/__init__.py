"""The model-host process: owns the device and every loaded model.

Only :mod:`model_host.ipc` may be imported by the HTTP side; everything else here imports torch.
"""
