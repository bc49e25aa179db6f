"""Coordination through etcd: who leads the cluster, and in which term.

LetheDB does not run a consensus protocol of its own. etcd (which does) holds
one leader key per cluster under a lease, and the key's create revision is the
term. This package is of the api/ops tier: it talks gRPC to etcd with the
stubs generated from the subset of etcd's API in ``etcdpb`` and never touches
the engine or the storage.

* :mod:`.etcd`: a small etcd v3 client (leases, transactions, ranges, watches);
* :mod:`.election`: the election itself, with the clock-based step-down and the
  rule that only an up-to-date node may campaign.
"""
