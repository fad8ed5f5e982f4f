"""tokens -> LLM space"""
