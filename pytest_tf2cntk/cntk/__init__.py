"""cntk"""
