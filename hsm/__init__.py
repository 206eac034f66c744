"""Token boundary: PKCS#11 and software implementations of kms.keystore.KeyStore."""
