-- Deliveries taken for gating are reserved for a while, like claims, so that two dispatchers
-- never parse and gate the same delivery at once.
ALTER TABLE deliveries ADD COLUMN gate_owner TEXT;
ALTER TABLE deliveries ADD COLUMN gate_until INTEGER;
