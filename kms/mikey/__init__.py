"""Pure MIKEY / MIKEY-TICKET codec and key schedule (RFC 3830, RFC 6043).

Nothing in this package performs I/O, reads the clock or touches a token: it works on
bytes, on times passed in, and on HMAC callables supplied by the caller.
"""
