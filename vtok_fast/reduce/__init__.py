"""tokens -> fewer tokens"""
