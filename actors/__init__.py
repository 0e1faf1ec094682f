"""The store-management domain (complaints, audit, resolution saga, notifications).

Plugged into the runtime through ``topology.yaml``; the runtime never imports this package.
"""
