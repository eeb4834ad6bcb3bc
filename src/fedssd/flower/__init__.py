"""fedssd on Flower: a ServerApp and a ClientApp that run any registered method.

The only package of fedssd that imports ``flwr`` (install it with ``pip install "fedssd[flower]"``).
The Flower App (``fedssd flower-app DIR`` writes it; ``src/fedssd/configs/flower_app/`` in the
repository) points Flower at
``fedssd.flower.server_app:app`` and ``fedssd.flower.client_app:app``; docs/flower.md shows how to
run it in Flower's simulation and on real SuperLink / SuperNode deployments.
"""
