"""parity/localize"""
