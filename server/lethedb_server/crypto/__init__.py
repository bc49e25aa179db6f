"""Encryption: the AEAD helpers and the keyring (master keys, KeyProvider)."""
