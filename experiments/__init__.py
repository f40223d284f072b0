"""Small, documented experiments whose output the README quotes."""
