"""Team vaults in git: the format, verification, identities and the pre-commit guard."""
