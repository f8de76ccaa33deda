"""Readers of files a user names, in formats whose own parsers trust their input: pickles
(an allow-list of globals, arrays rebuilt from checked states), .npy/.npz (headers checked
against the bytes, CRC-32s verified), .mat (parsed in a child process with limits). Every
failure is an errors.UserError naming the file."""
