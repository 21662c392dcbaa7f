"""Teacher generation: DSS prompts, answer parsing, LLM backends, response cache, cost."""
