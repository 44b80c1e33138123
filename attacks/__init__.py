"""Membership-inference audits and compliance reports. Imports ``dpfed`` and ``accounting``."""
