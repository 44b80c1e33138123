"""dpfed on Flower: a ``ServerApp`` and a ``ClientApp`` around the same client step and aggregation.

Each site runs :meth:`dpfed.client.Client.fit` (budget check, K DP-SGD steps on R, events
appended to the site's own ledger before the reply leaves) and the server runs
:meth:`dpfed.methods.FedSBMethod.aggregate`, exactly as ``dpfed train`` does in process.

Modules: :mod:`~dpfed.flower.settings` (node and run configuration, the rules a Flower run
adds), :mod:`~dpfed.flower.site` (a site's data, model and client), :mod:`~dpfed.flower.records`
(Flower records and the reply check), :mod:`~dpfed.flower.client_app`,
:mod:`~dpfed.flower.strategy`, :mod:`~dpfed.flower.server_app`, :mod:`~dpfed.flower.local`
(SuperLink and SuperNodes on loopback) and :mod:`~dpfed.flower.certs` (throwaway TLS material).

Only the modules that talk to Flower import ``flwr`` (an optional extra: ``pip install
'.[flower]'``); the rest of dpfed never imports this package.
"""
