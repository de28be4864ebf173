"""Drop-in adapters for existing trainers (optional extras; nothing else imports them)."""
