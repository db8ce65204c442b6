"""Ports: the Protocols the reactor talks through and the plain data they exchange.

Adapters (``roost.adapters``) implement them against real systems;
``roost.testing`` ships fakes that pass the same contract tests.
"""
