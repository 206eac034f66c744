"""MIKEY-TICKET Key Management Service."""
