"""The trio layer under the releaser and the device: framed peers, TLS, dialling.

It imports only :mod:`fleetpush.protocol` (tests/architecture guards that);
``fleetpush.server``, ``fleetpush.client`` and the front ends build on it.
"""
