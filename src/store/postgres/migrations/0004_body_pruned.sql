-- True once retention dropped the body of a delivery whose row is kept.
ALTER TABLE deliveries ADD COLUMN body_pruned BOOLEAN NOT NULL DEFAULT false;
